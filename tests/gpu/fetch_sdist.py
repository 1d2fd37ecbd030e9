"""Download one sdist from the package index pip is configured with, without building it.

    python3 tests/gpu/fetch_sdist.py DEST_DIR PROJECT VERSION

`pip download` prepares an sdist's metadata, and the metadata step of grouped_gemm and
megablocks needs a CUDA build of torch. This asks pip's own finder (index-url, extra-index-url,
find-links, certificates: whatever pip's configuration and PIP_* variables say) for the file
and fetches it with pip's session; the sha256 the index publishes is checked. Uses pip
internals (`create_command`, `_build_package_finder`), stable since pip 20; run where pip
reaches an index (not on the GPU machine).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("error: usage: fetch_sdist.py DEST_DIR PROJECT VERSION", file=sys.stderr)
        return 2
    dest, project, version = Path(argv[0]), argv[1], argv[2]
    from pip._internal.commands import create_command
    from pip._vendor.packaging.specifiers import SpecifierSet

    cmd = create_command("download")
    options, _ = cmd.parse_args(["--no-deps", "--no-binary", ":all:", f"{project}=={version}"])
    with cmd.main_context():
        session = cmd.get_default_session(options)
        finder = cmd._build_package_finder(options, session)
        found = finder.find_best_candidate(project, SpecifierSet(f"=={version}"))
        if found.best_candidate is None:
            print(f"error: no sdist of {project}=={version} on pip's index", file=sys.stderr)
            return 1
        link = found.best_candidate.link
        resp = session.get(link.url_without_fragment)
        resp.raise_for_status()
    data = resp.content
    want = link.hash if link.hash_name == "sha256" else None
    if want and hashlib.sha256(data).hexdigest() != want:
        print(f"error: {link.filename}: sha256 differs from the index's", file=sys.stderr)
        return 1
    dest.mkdir(parents=True, exist_ok=True)
    (dest / link.filename).write_bytes(data)
    print(dest / link.filename)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
