"""The lm-eval adapter (eval/lm_adapter.py) against the harness's own `hf` model."""

from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance

from eval.checkpoint import load_for_eval
from eval.export import export_loaded
from eval.generate import greedy_generate
from eval.lm_adapter import MopLM

from .conftest import MAX_SEQ_LEN


def req(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


LOGLIK = [
    ("The cat sat", " on the mat."),
    ("", "A dog ran."),  # empty context: conditioned on EOS
    ("Question: what is red? Answer:", " blue"),
    ("Question: what is red? Answer: ", "blue"),  # trailing space moves to the continuation
    ("one two three four five " * 6, " six"),  # longer than the context: left-truncated
    ("The", " big tree"),
]
ROLLING = ["The quick dog ran on the log. " * 12, "A cat."]  # several windows, and one
GEN_KW = {"until": ["."], "max_gen_toks": 10}


@pytest.fixture(scope="module")
def loaded(trained_run):
    return load_for_eval(trained_run)


@pytest.fixture(scope="module")
def ours(loaded):
    return MopLM(model=loaded.model, tokenizer=loaded.tokenizer, batch_size=3, max_gen_toks=10)


def generations(lm, until_sets, prompts):
    reqs = [
        req("generate_until", p, {"until": u, "max_gen_toks": 10})
        for p in prompts
        for u in until_sets
    ]
    return lm.generate_until(reqs, disable_tqdm=True)


PROMPTS = ["The cat", "Question: what is big? Answer: the big", "A", "one two three four " * 9]


def test_same_scores_and_generations_as_the_harness_hf_model(loaded, ours, tmp_path):
    pytest.importorskip("accelerate")  # the harness's hf model imports it
    from lm_eval.models.huggingface import HFLM

    export = export_loaded(loaded, tmp_path / "hf", torch.float32)
    hf = HFLM(pretrained=str(export), device="cpu", batch_size=2, dtype="float32")
    assert hf.max_length == ours.max_length == MAX_SEQ_LEN
    assert hf.prefix_token_id == ours.prefix_token_id

    reqs = [req("loglikelihood", *a) for a in LOGLIK]
    for (a, ga), (b, gb) in zip(ours.loglikelihood(reqs), hf.loglikelihood(reqs), strict=True):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    rolling = [req("loglikelihood_rolling", t) for t in ROLLING]
    assert ours.loglikelihood_rolling(rolling) == pytest.approx(
        hf.loglikelihood_rolling(rolling), abs=1e-3
    )
    # Stop strings taken from the model's own free generations, so that cuts really happen.
    free = generations(ours, [["zzz"]], PROMPTS)
    stops = [["zzz"], ["."], [t[3:5] or "zzz" for t in free]]
    got = generations(ours, stops, PROMPTS)
    assert got == generations(hf, stops, PROMPTS)
    assert any(g != f for g, f in zip(got[2::3], free))  # some output was cut


def test_generation_stops_and_cuts_at_until_and_max_gen_toks(loaded, ours):
    prompts = [ours.tok_encode(p)[-(MAX_SEQ_LEN - 7) :] for p in PROMPTS]
    outs = greedy_generate(loaded.model, prompts, 7)
    assert [len(o) for o in outs] == [7] * len(prompts)
    # A stop rule ends each row on its own; the other rows go on.
    stopped = greedy_generate(loaded.model, prompts, 7, stop=lambda ids: len(ids) >= 3)
    assert stopped == [o[:3] for o in outs]
    free = generations(ours, [["zzz"]], PROMPTS)
    for prompt, text in zip(PROMPTS, free):
        if len(text) < 4:
            continue
        stop = text[2:4]
        (cut,) = generations(ours, [[stop]], [prompt])
        assert cut == text[: text.index(stop)]
        assert stop not in cut


def test_batching_does_not_change_results(loaded, ours):
    one = MopLM(model=loaded.model, tokenizer=loaded.tokenizer, batch_size=1, max_gen_toks=10)
    reqs = [req("loglikelihood", *a) for a in LOGLIK]
    for (a, ga), (b, gb) in zip(ours.loglikelihood(reqs), one.loglikelihood(reqs), strict=True):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    assert generations(ours, [["."]], PROMPTS) == generations(one, [["."]], PROMPTS)


def test_bfloat16_autocast_scores_close_to_fp32(loaded, ours):
    """--dtype bfloat16 (what a GPU eval uses) runs the forward under bf16 autocast: scores
    stay within bf16 rounding of fp32 (measured: at most 1.4e-3 nats per request on this tiny
    model; bound 2e-2), and autocast really applies (they are not bitwise the fp32 ones)."""
    bf16 = MopLM(
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        batch_size=3,
        max_gen_toks=10,
        dtype="bfloat16",
    )
    reqs = [req("loglikelihood", *a) for a in LOGLIK]
    ref, got = ours.loglikelihood(reqs), bf16.loglikelihood(reqs)
    diffs = [abs(a - b) for (a, _), (b, _) in zip(ref, got, strict=True)]
    assert 0 < max(diffs) < 2e-2
    assert len(generations(bf16, [["."]], PROMPTS)) == len(PROMPTS)


def test_loglikelihood_is_the_sum_of_token_logprobs(loaded, ours):
    ctx, cont = ours.tok_encode("The cat sat"), ours.tok_encode(" on the mat")
    with torch.no_grad():
        logp = torch.log_softmax(loaded.model(torch.tensor([ctx + cont])).logits[0], -1)
    want = sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
    greedy = all(int(logp[len(ctx) - 1 + i].argmax()) == t for i, t in enumerate(cont))
    ((got, is_greedy),) = ours._loglikelihood_tokens([(None, ctx, cont)])
    assert got == pytest.approx(want, abs=1e-4) and is_greedy == greedy


def test_registered_and_built_from_a_checkpoint_path(trained_run):
    from lm_eval.api.registry import get_model

    cls = get_model("mop")
    assert cls is MopLM
    lm = cls.create_from_arg_string(f"pretrained={trained_run},batch_size=4,max_gen_toks=8")
    assert lm.batch_size == 4 and lm.max_gen_toks == 8 and lm.loaded.ref.step == 4


def test_refuses_sampling_and_too_long_generations(ours):
    with pytest.raises(Exception, match="greedily"):
        ours.generate_until([req("generate_until", "A", {"do_sample": True, "temperature": 1})])
    with pytest.raises(Exception, match="no room"):
        ours.generate_until([req("generate_until", "A", {"max_gen_toks": MAX_SEQ_LEN})])


def _tasks(path: str) -> list[dict]:
    data = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": path}}}
    prompt = "Question: {{q}}\nAnswer:"
    gen = {
        "task": "mop_gen",
        **data,
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": prompt,
        "doc_to_target": "{{a}}",
        "generation_kwargs": {"until": ["\n", "."], "max_gen_toks": 6, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }
    mc = {
        "task": "mop_mc",
        **data,
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": prompt,
        "doc_to_target": "{{label}}",
        "doc_to_choice": "{{choices}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    return [gen, mc]


def _harness_run(rank: int, world: int, init: str, run_dir: str, data: str, out) -> None:
    """simple_evaluate in one of `world` processes; rank 0 stores the per-document answers."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        lm = MopLM(pretrained=run_dir, batch_size=4, device="cpu")
        res = simple_evaluate(
            model=lm,
            tasks=_tasks(data),
            task_manager=TaskManager(include_defaults=False),
            cache_requests=False,
            bootstrap_iters=0,
            log_samples=True,
        )
        if res is not None:
            # resps[request][repeat]; the harness pads the shorter rank with a repeat of its
            # last request, which adds a second entry there: compare the first.
            out[rank] = {
                task: sorted((s["doc_id"], [r[0] for r in s["resps"]]) for s in samples)
                for task, samples in res["samples"].items()
            }
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def test_harness_data_parallel_gives_the_serial_answers(trained_run, tmp_path):
    """Under torchrun the harness shards documents by our rank/world_size and gathers through
    our all_gather/gather_object: the answers equal those of one process."""
    import json

    import torch.multiprocessing as mp

    data = tmp_path / "qa.jsonl"
    rows = [
        {
            "q": f"What is {i}?",
            "a": str(i),
            "choices": ["red", "blue", "a big tree"],
            "label": i % 3,
        }
        for i in range(5)  # odd: the ranks get different numbers of documents
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    serial: dict = {}
    _harness_run(0, 1, "", str(trained_run), str(data), serial)
    with mp.Manager() as manager:
        out = manager.dict()
        init = f"file://{tmp_path / 'pg'}"
        mp.spawn(
            _harness_run, args=(2, init, str(trained_run), str(data), out), nprocs=2, join=True
        )
        parallel = dict(out)
    assert set(parallel) == {0}  # results only on rank 0
    # Generations must be identical; loglikelihoods may differ in the last float32 bits
    # because the documents are batched (and padded) differently on each rank.
    assert parallel[0]["mop_gen"] == serial[0]["mop_gen"]
    par_mc, ser_mc = parallel[0]["mop_mc"], serial[0]["mop_mc"]
    assert [d for d, _ in par_mc] == [d for d, _ in ser_mc]
    for (_, par), (_, ser) in zip(par_mc, ser_mc):
        assert [g for _, g in par] == [g for _, g in ser]  # is_greedy flags
        assert [ll for ll, _ in par] == pytest.approx([ll for ll, _ in ser], abs=1e-4)
    assert len(serial[0]["mop_mc"]) == 5 and len(serial[0]["mop_gen"]) == 5
