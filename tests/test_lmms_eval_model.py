"""lmms_eval_model.py on the synthetic world, offline, with hand-built lmms-eval Instances: its answers against
evaluate.py's predictions file for the same rows, byte for byte; max_new_tokens and until against the cache-free
greedy loop of test_evaluate_run; loglikelihood on a planted case; multi-round against sample.py's chat; the entry
point that --register writes, resolved by lmms-eval's own registry."""
import importlib.metadata
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval.api.model")
from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.models.registry_v2 import ModelRegistryV2  # noqa: E402

import evaluate as ev  # noqa: E402
import sample  # noqa: E402
from benchmarks import benchmark_spec, load_benchmark  # noqa: E402
from lmms_eval_model import TokenSpaceLMMS, register  # noqa: E402
from test_evaluate_run import evaluate_argv, greedy_without_cache, jsonl, make_checkpoint  # noqa: E402

BENCHMARKS = ["SYNTH_CAPTION", "SYNTH_VQA"]  # two generation budgets: 32 and 10 new tokens
SPLIT = "test"


def doc_to_visual(doc):
    return [doc["image"]]


def request(kind, doc_id, task, *args):
    """An Instance as lmms-eval's Task.construct_requests makes it; args: what comes before doc_to_visual."""
    if kind == "generate_until_multi_round":
        arguments = (*args[:2], doc_to_visual, args[2], doc_id, task, SPLIT)
    else:
        arguments = (*args, doc_to_visual, doc_id, task, SPLIT)
    return Instance(request_type=kind, arguments=arguments, idx=0,
                    metadata={"task": task, "doc_id": doc_id, "repeats": 1})


@pytest.fixture(scope="module")
def setting(synthetic_world, tmp_path_factory):
    """A tiny checkpoint, evaluate.py's predictions for it (batches of 4, no JPEG round trip), the lmms-eval model
    of it with the benchmarks' rows as its task docs."""
    world, root = synthetic_world, tmp_path_factory.mktemp("lmms")
    vlm = make_checkpoint(world, root / "ck", n_l=16, seed=0)
    ev.main(evaluate_argv(world, root / "eval", [str(root / "ck")], BENCHMARKS, "--jpeg_reencode=False"))
    model = TokenSpaceLMMS(ckpt=str(root / "ck"), batch_size=4)
    rows = {name: load_benchmark(name, str(world / "bench" / f"{name}.tsv")) for name in BENCHMARKS}
    model.task_dict = {name: {SPLIT: [{"image": row.images(jpeg_reencode=False)[-1], "prompt": row.prompt}
                                      for row in rows[name]]} for name in BENCHMARKS}
    return {"vlm": vlm, "model": model, "rows": rows, "predictions": root / "eval" / "VQQ_nl16"}


def test_answers_equal_evaluate_py_predictions(setting):
    model = setting["model"]
    for name in BENCHMARKS:
        gen_kwargs = {"max_new_tokens": benchmark_spec(name).max_new_tokens, "until": []}
        requests = [request("generate_until", i, name, doc["prompt"], dict(gen_kwargs))
                    for i, doc in enumerate(model.task_dict[name][SPLIT])]
        expected = [line["prediction"] for line in jsonl(setting["predictions"] / f"predictions_{name}.jsonl")]
        assert model.generate_until(requests) == expected
        assert len(set(expected)) > 1  # the answers depend on the row


def test_max_new_tokens_and_until(setting):
    model, name = setting["model"], "SYNTH_VQA"
    doc = model.task_dict[name][SPLIT][1]
    ids = greedy_without_cache(setting["vlm"], model.token_space, doc["image"], [(doc["prompt"], None)], 3)
    three_tokens = model.token_space.sp.decode(ids).strip()
    (answer,) = model.generate_until([request("generate_until", 1, name, doc["prompt"], {"max_new_tokens": 3})])
    assert answer == three_tokens
    stop = three_tokens[len(three_tokens) // 2:]  # a stop string inside the answer
    (cut,) = model.generate_until([request("generate_until", 1, name, doc["prompt"],
                                           {"max_new_tokens": 3, "until": [stop]})])
    assert cut == three_tokens.split(stop)[0] and len(cut) < len(answer)


def test_the_greedy_answer_has_the_highest_loglikelihood(setting):
    """Planted: the options are single word tokens; one of them is made the greedy first answer token (its row of the
    LLM's output layer set to twice the greedy token's, so its logit is twice the largest one, which is positive, in
    both the model under test and the reference); so it must score highest and be the only one flagged greedy."""
    model, name = setting["model"], "SYNTH_CAPTION"
    sp = model.token_space.sp
    doc = model.task_dict[name][SPLIT][0]

    def greedy():
        return greedy_without_cache(setting["vlm"], model.token_space, doc["image"], [(doc["prompt"], None)], 1)

    (first,) = greedy()
    options = [word for word in ("red", "blue", "green", "yellow", "empty") if len(sp.encode(word)) == 1
               and sp.encode(word) != [first]]
    assert len(options) >= 4
    (planted,) = sp.encode(options[1])
    heads = [setting["vlm"].llm.lm_head.weight, model.vlm.llm.lm_head.weight]
    saved = [head[planted].clone() for head in heads]
    try:
        with torch.no_grad():
            for head in heads:
                head[planted] = 2 * head[first]
        assert greedy() == [planted]
        scores = model.loglikelihood([request("loglikelihood", 0, name, doc["prompt"], " " + option)
                                      for option in options])
    finally:
        with torch.no_grad():
            for head, row in zip(heads, saved):
                head[planted] = row
    assert greedy() == [first]  # restored
    assert [is_greedy for _, is_greedy in scores] == [k == 1 for k in range(len(options))]
    assert max(range(len(options)), key=lambda k: scores[k][0]) == 1
    assert all(logprob < 0 for logprob, _ in scores)


def test_multi_round_equals_sample_py_chat(setting):
    model, name = setting["model"], "SYNTH_VQA"
    doc = model.task_dict[name][SPLIT][2]
    later = ["Is there a blue triangle in the image?", "How many circles are there in the image?"]
    seen = []

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        """lmms-eval's multi-round protocol: -> (visuals, next question, done, previous_output, round info)."""
        seen.append(list(previous_output))
        done = round_idx > len(later)
        return None, None if done else later[round_idx - 1], done, previous_output, None

    (answers,) = model.generate_until_multi_round([request("generate_until_multi_round", 2, name, doc["prompt"],
                                                           {"max_new_tokens": 12}, doc_to_text)])
    expected = sample.chat(model.vlm, model.token_space, doc["image"], [doc["prompt"], *later], 12, model.device,
                           model.dtype)
    assert answers == expected and len(answers) == 3
    assert seen == [expected[:1], expected[:2], expected]


def test_register_writes_an_entry_point_lmms_eval_resolves(tmp_path):
    written = register(str(tmp_path))
    (dist,) = importlib.metadata.distributions(path=[str(tmp_path)])
    assert dist.metadata["Name"] == "tokenspace-lmms-eval"
    (entry_point,) = [ep for ep in dist.entry_points if ep.group == "lmms_eval.models"]
    registry = ModelRegistryV2()
    registry.register_manifest(entry_point.load()())
    assert registry.get_model_class("tokenspace") is TokenSpaceLMMS
    record = (tmp_path / "tokenspace_lmms_eval-0.dist-info" / "RECORD").read_text().split()
    assert sorted(str(tmp_path / line.rstrip(",")) for line in record) == sorted(written)
    assert (tmp_path / "tokenspace_lmms_eval.pth").read_text() == f"{Path(__file__).resolve().parent.parent}\n"
