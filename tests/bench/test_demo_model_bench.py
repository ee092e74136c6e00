"""``benchmarks/demo_model.py``'s parts that need no server: the held-out chat prompts (the server's tokens, a
ShareGPT file ``bench serve`` reads back), the acceptance arithmetic, the pairing of served runs into speed-ups, the
recall of a selection on hand-made attention, the recorder on a real network, the checkpoint loaded into the
trainer's network over a compact vocabulary, the logit comparison, and the DSA report on an exported toy model."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch

from dsv32.bench.datasets import TokenCounter, sample_sharegpt_requests
from dsv32.engine.outputs import SpecDecodeStats
from dsv32.tokenizer import Tokenizer
from dsv32.train.corpus import TASKS, examples, render
from dsv32.train.demo import toy_config
from dsv32.train.export import export_checkpoint
from dsv32.train.network import TrainableDeepseekV32
from tests.benchmark_scripts import benchmark_module

COMPACT_VOCAB = 300


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("demo_model.py") as module:
        yield module


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_pretrained(None)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainableDeepseekV32, torch.Tensor, Path]:
    """A toy model (index_topk 16) with O(1) weights, exported over 300 used tokens."""
    torch.manual_seed(0)
    model = TrainableDeepseekV32(toy_config(), COMPACT_VOCAB).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(1 + 0.2 * torch.randn(param.shape) if param.dim() == 1
                        else torch.randn(param.shape) / param.shape[1] ** 0.5)
    token_ids = torch.randperm(toy_config().vocab_size)[:COMPACT_VOCAB].sort().values
    return model, token_ids, export_checkpoint(model, token_ids, tmp_path_factory.mktemp("toy"))


# ---- held-out prompts ---------------------------------------------------------------------------------------------


def test_heldout_prompts_are_the_servers_chat_prompts_of_every_task(bench, tokenizer: Tokenizer) -> None:
    prompts = bench.heldout_prompts(tokenizer, 2, seed=5, tasks=TASKS)
    assert [p.task for p in prompts] == [task for task in TASKS for _ in range(2)]
    heldout = [ex for task in TASKS for ex in examples(2, 5, "heldout", (task,))]
    for prompt, example in zip(prompts, heldout, strict=True):
        assert prompt.text == render(example).prompt
        assert prompt.token_ids == tokenizer.encode(prompt.text)
        assert prompt.token_ids[0] == tokenizer.bos_token_id != prompt.token_ids[1]  # one BOS, from the text
        assert prompt.reference_reply.endswith(tokenizer.eos_token)


def test_the_sharegpt_file_gives_bench_serve_the_prompts_exactly(bench, tokenizer: Tokenizer,
                                                                 tmp_path: Path) -> None:
    prompts = bench.heldout_prompts(tokenizer, 3, seed=6, tasks=TASKS)
    path = tmp_path / "heldout.json"
    assert bench.write_sharegpt(prompts, path) == len(prompts)
    samples = sample_sharegpt_requests(TokenCounter(tokenizer), len(prompts), str(path), output_len=64)
    assert sorted(s.prompt for s in samples) == sorted(p.text for p in prompts)
    lengths = {p.text: len(p.token_ids) for p in prompts}
    assert all(s.prompt_len == lengths[s.prompt] and s.expected_output_len == 64 for s in samples)


# ---- MTP -----------------------------------------------------------------------------------------------------------


def test_acceptance_length_and_per_position_rates(bench) -> None:
    stats = SpecDecodeStats()
    for accepted in (2, 0, 1):  # three verify steps of k = 2 drafts
        stats.observe(2, accepted)
    row = bench.Acceptance("arithmetic", 2, stats, output_tokens=6, same_tokens=True)
    assert row.mean_length == pytest.approx(2.0)  # 1 + 3 accepted / 3 drafts
    assert row.draft_acceptance_rate == pytest.approx(0.5)  # 3 of 6 draft tokens
    assert row.per_position == pytest.approx([2 / 3, 1 / 3])
    # A k no draft ever reached past position 1 has zero there; no drafts at all is not a number.
    short = SpecDecodeStats()
    short.observe(3, 1)
    assert bench.Acceptance("tools", 3, short, 2, True).per_position == pytest.approx([1.0, 0.0, 0.0])
    empty = bench.Acceptance("json", 1, SpecDecodeStats(), 0, True)
    assert math.isnan(empty.mean_length) and math.isnan(empty.per_position[0])


def test_speedups_pair_each_run_with_its_rounds_baseline(bench) -> None:
    def run(k: int, concurrency: int, round_index: int, tps: float):
        return bench.ServedRun(k, concurrency, round_index, tps, 10.0, 4, 0, 64, None)

    runs = [run(0, 1, 0, 100.0), run(1, 1, 0, 150.0), run(0, 1, 1, 50.0), run(1, 1, 1, 60.0),
            run(0, 8, 0, 400.0), run(2, 8, 0, 200.0), run(2, 8, 1, 999.0)]  # round 1 at 8 has no baseline
    assert bench.speedups(runs) == {(1, 1): [1.5, 1.2], (2, 8): [0.5]}
    assert [bench.round_order([0, 1, 2], r) for r in range(4)] == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]


def test_servers_differ_only_in_their_speculative_config(bench, tmp_path: Path) -> None:
    args = argparse.Namespace(enforce_eager=False, threads=None)
    plain, mtp = (bench.server_spec(tmp_path, 8000, k, args).command for k in (0, 2))
    assert "--no-enable-prefix-caching" in plain and "--speculative-config" not in plain
    assert mtp[:len(plain)] == plain
    assert mtp[len(plain):] == ["--speculative-config", '{"method": "mtp", "num_speculative_tokens": 2}']
    client = bench.bench_command(8000, tmp_path, tmp_path / "data.json", 32, 8, 256, tmp_path / "result.json")
    flags = dict(zip(client[5::2], client[6::2], strict=False))
    assert flags["--extra-body"] == '{"add_special_tokens": false}' and flags["--endpoint"] == "/v1/completions"
    assert flags["--max-concurrency"] == flags["--num-warmups"] == "8"


# ---- DSA -----------------------------------------------------------------------------------------------------------


def test_kept_mass_of_a_hand_made_attention(bench) -> None:
    # Two heads over 4 keys; top-2: queries 2 and 3 have more causal keys than that, 0 and 1 are not counted.
    probs = torch.tensor([[[1, 0, 0, 0], [0.5, 0.5, 0, 0], [0.6, 0.2, 0.2, 0], [0.1, 0.1, 0.3, 0.5]],
                          [[1, 0, 0, 0], [0.5, 0.5, 0, 0], [0.4, 0.4, 0.2, 0], [0.1, 0.3, 0.3, 0.3]]])
    mass = bench.head_mass(probs)
    assert torch.allclose(mass[2], torch.tensor([0.5, 0.3, 0.2, 0.0])) and torch.allclose(mass.sum(-1), torch.ones(4))
    inf = float("-inf")
    indexer = torch.tensor([[0, inf, inf, inf], [0, 1, inf, inf], [5, 1, 3, inf], [0, 9, 1, 8]])
    assert bench.kept_mass(mass, indexer, 2).tolist() == pytest.approx([0.7, 0.6])  # keys {0, 2}, {1, 3}
    assert bench.kept_mass(mass, mass, 2).tolist() == pytest.approx([0.8, 0.7])  # the best two keys
    assert bench.kept_mass(mass, bench.recency(4), 2).tolist() == pytest.approx([0.5, 0.7])  # keys {1, 2}, {2, 3}


def test_recorder_on_a_network_measures_every_layer_and_both_runs(bench) -> None:
    torch.manual_seed(1)
    config = toy_config()
    model = TrainableDeepseekV32(config, 50).eval()
    recorder = bench.RecallRecorder(config.index_topk)
    handles = recorder.attach(model)
    ids = torch.randint(0, 50, (1, 40))
    for mode in ("dense", "sparse"):
        recorder.mode = mode
        with torch.no_grad():
            model(ids, sparse=mode == "sparse")
    for handle in handles:
        handle.remove()
    layers = config.num_hidden_layers + config.num_nextn_predict_layers
    for layer in range(layers):
        queries = 40 - (layer == config.num_hidden_layers) - config.index_topk  # the MTP layer sees 39 positions
        indexer, oracle, window = (recorder.recall("dense", layer, s) for s in bench.SELECTIONS)
        assert len(indexer) == queries
        assert ((indexer > 0) & (indexer <= oracle + 1e-6) & (window <= oracle + 1e-6)).all()
        assert (indexer < 1).all()  # 24 of up to 40 keys left out: some mass is lost
    # Layer 0 reads the embeddings in both runs; the layers above read what sparse attention made.
    assert torch.equal(recorder.recall("dense", 0, "indexer"), recorder.recall("sparse", 0, "indexer"))
    assert not torch.equal(recorder.recall("dense", 1, "indexer"), recorder.recall("sparse", 1, "indexer"))


def test_checkpoint_loads_into_a_compact_network_with_the_models_logits(
        bench, exported: tuple[TrainableDeepseekV32, torch.Tensor, Path]) -> None:
    model, token_ids, path = exported
    network = bench.load_network(path)
    assert torch.equal(network.token_ids, token_ids)
    assert network.others == toy_config().vocab_size - COMPACT_VOCAB
    real = token_ids[torch.randint(0, COMPACT_VOCAB, (40,), generator=torch.Generator().manual_seed(3))]
    unseen = int(torch.isin(torch.arange(1000), token_ids, invert=True).nonzero()[0, 0])
    assert network.compact([unseen]).tolist() == [COMPACT_VOCAB]  # a token without an embedding: the shared column
    compact = network.compact(real.tolist())
    assert torch.equal(token_ids[compact], real)
    with torch.no_grad():
        ours = network.model(compact[None], sparse=True).logits[0, :, :COMPACT_VOCAB + 1]
        trained = model(compact[None], sparse=True).logits[0]  # its last column: every other token
    assert (ours - trained).abs().max().item() <= 1e-4
    # Log-probabilities over the real vocabulary: the shared column stands for `others` tokens.
    log_probs = network.log_probs(ours)
    total = log_probs[:, :-1].exp().sum(-1) + network.others * log_probs[:, -1].exp()
    assert torch.allclose(total, torch.ones(len(total)), atol=1e-5)


def test_logit_comparison_of_hand_made_logits(bench) -> None:
    dense = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]])
    sparse = torch.tensor([[1.0, 2.0, 4.0], [0.0, 2.0, 1.0]])
    per_position = bench.compare_logits(dense, sparse, dense.log_softmax(-1), sparse.log_softmax(-1),
                                        torch.tensor([2, 1]))
    summary = bench.summarize_logits([per_position, per_position])
    assert summary.positions == 4 and summary.max_abs == pytest.approx(2.0)
    assert summary.mean_abs == pytest.approx(0.5)  # per position 1/3 and 2/3
    assert summary.greedy_agreement == pytest.approx(0.5)  # the second argmax moves from 2 to 1
    assert summary.dense_nll == pytest.approx(-(dense.log_softmax(-1)[0, 2] + dense.log_softmax(-1)[1, 1]).item() / 2)
    assert summary.sparse_nll < summary.dense_nll


@pytest.mark.e2e  # the report's machine and checkout lines run uname and git
def test_dsa_report_on_an_exported_toy(bench, exported: tuple[TrainableDeepseekV32, torch.Tensor, Path],
                                       tmp_path: Path) -> None:
    _, _, path = exported
    output = tmp_path / "report.md"
    assert bench.main(["--checkpoint", str(path), "--parts", "dsa", "--dsa-sequences", "2", "--dsa-min-len", "40",
                       "--dsa-long-sequences", "1", "--dsa-long-len", "64", "--work-dir", str(tmp_path),
                       "--output", str(output)]) == 0
    report = output.read_text()
    assert "### DSA (index_topk 16; trainer's network, fp32)" in report
    assert "| 2 (MTP) | " in report and "joined to 64 tokens**: 1 sequence of 64-64 tokens" in report
    assert "### MTP" not in report


def test_bad_arguments_are_one_line_errors(bench, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--checkpoint", str(tmp_path / "missing")])
    assert exit_info.value.code == 2 and "no config.json there" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--checkpoint", str(tmp_path), "--repeats", "0"])
