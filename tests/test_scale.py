"""Data parallelism through `mmr1 fit` on 2 CPU processes (gloo), with batches whose modality sets differ across
ranks (image-only, audio-only, text-only, both): DDP equals one process with the doubled batch, FSDP2 equals
DDP, and a sharded FSDP checkpoint survives a SIGKILL in the middle of overwriting it, resumes exactly and exports
to one directory."""
from __future__ import annotations

import pytest
import torch

from data_pipelines.synth import synthesize
from e2e_utils import tiny_demo_config
from mmr1.checkpoint import is_sharded, model_from_checkpoint, read_checkpoint
from mmr1.cli import main
from mmr1.model import MultimodalR1
from scale_utils import mixed_manifest, run_fit, run_python, scale_config, train_losses

STEPS = 5
# 4-record blocks: global batch i = blocks 2i (rank 0) and 2i + 1 (rank 1) when each rank takes 4.
BLOCKS = ["image", "audio", "text", "both", "audio", "image", "both", "text", "image", "audio"]
# The switch load-balancing loss is a per-micro-batch statistic (every DP implementation computes it per rank),
# so equivalence with one process holds without it; the aux-free router bias (reduced over ranks) stays on.
MODEL = {"backbone": {"moe": {"aux_loss_coef": 0.0, "aux_free_bias": True}}}
FSDP = {"class_path": "mmr1.parallel.fsdp.FSDPStrategy"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scale")
    data = tmp / "data"
    synthesize(data, num_train=24, num_val=8, num_test=8, text_records=4, seed=1)
    manifest = mixed_manifest(data, BLOCKS, block_size=4)
    base = tiny_demo_config(tmp, data, max_steps=STEPS, train_manifest=str(manifest))
    one = scale_config(base, tmp / "one", batch_size=8, model=MODEL, data={"shuffle": False})
    run_fit(one)
    return tmp, base, train_losses(tmp / "one")


@pytest.fixture(scope="module")
def ddp(setup):
    tmp, base, _ = setup
    config = scale_config(base, tmp / "ddp", batch_size=4, devices=2, strategy="ddp", model=MODEL,
                          data={"shuffle": False})
    run_fit(config)
    return tmp / "ddp", train_losses(tmp / "ddp")


def assert_losses_close(got: dict, expected: dict, steps, tol: float) -> None:
    assert sorted(got) == sorted(steps), got
    for step in steps:
        assert abs(got[step] - expected[step]) <= tol, (step, got[step], expected[step])


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_with_doubled_batch(setup, ddp):
    _, _, one = setup
    _, losses = ddp
    assert_losses_close(losses, one, range(STEPS), tol=1e-5)
    assert one[STEPS - 1] < one[0]  # it trains


@pytest.mark.slow
def test_fsdp_equals_ddp_resumes_sharded_after_sigkill_and_exports(setup, ddp, tmp_path):
    tmp, base, _ = setup
    ddp_dir, ddp_losses = ddp
    model = {**MODEL, "parallel": {"data_parallel": "fsdp"}}
    killed = scale_config(base, tmp / "fsdp", batch_size=4, devices=2, strategy=FSDP, model=model,
                          data={"shuffle": False},
                          trainer={"callbacks": [*_callbacks(base), {"class_path": "scale_utils.KillInShardedSave",
                                                                     "init_args": {"step": 4}}]})
    proc = run_fit(killed, check=False)
    # SIGKILL in the middle of overwriting last.ckpt (step 2's) with step 4's: both ranks' new shards are written,
    # its meta.pt is not. last.ckpt is still step 2's, whole: written in place, it would have mixed the two steps.
    assert proc.returncode == -9, proc.stderr[-3000:]
    checkpoints = tmp / "fsdp" / "checkpoints"
    last = checkpoints / "last.ckpt"
    assert is_sharded(last) and len(list(last.glob("*.distcp"))) == 2  # one shard file per rank
    assert read_checkpoint(last)["global_step"] == 2
    assert (checkpoints / ".last.ckpt.partial").is_dir()  # the interrupted save
    resumed = scale_config(base, tmp / "fsdp", batch_size=4, devices=2, strategy=FSDP, model=model,
                           data={"shuffle": False})
    run_fit(resumed, "--ckpt_path", "last")
    versions = sorted((tmp / "fsdp" / "logs").iterdir())
    assert sorted(train_losses(versions[-1])) == list(range(2, STEPS))  # the resumed run redid steps 2..4
    assert_losses_close(train_losses(tmp / "fsdp"), ddp_losses, range(STEPS), tol=1e-5)
    assert read_checkpoint(last)["global_step"] == 4  # the resumed run saved step 4 over it
    assert not [p.name for p in checkpoints.iterdir() if p.name.startswith(".")]  # no staged or replaced left

    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(last), "--output", str(out)]) == 0
    exported, _ = MultimodalR1.from_pretrained(out)
    reference, _ = model_from_checkpoint(ddp_dir / "checkpoints" / "last.ckpt")
    for (name, a), (_, b) in zip(exported.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_distillation_under_ddp_and_fsdp_equals_one_process(setup, tmp_path):
    """model.distill under DDP and FSDP2: both the LM and the distillation terms are divided by the global token
    count, so two ranks with different modalities and token counts train exactly like one process with the doubled
    batch (each rank runs its own full, frozen teacher)."""
    tmp, base, _ = setup
    teacher = tmp_path / "teacher"
    assert main(["export", "--checkpoint", str(tmp / "one" / "checkpoints" / "last.ckpt"),
                 "--output", str(teacher)]) == 0
    model = {**MODEL, "distill": {"teacher": str(teacher), "weight": 0.5}}
    fsdp = {**model, "parallel": {"data_parallel": "fsdp"}}
    runs = {}
    for name, batch_size, devices, strategy, config_model in (("kd_one", 8, 1, "auto", model),
                                                               ("kd_ddp", 4, 2, "ddp", model),
                                                               ("kd_fsdp", 4, 2, FSDP, fsdp)):
        config = scale_config(base, tmp_path / name, batch_size=batch_size, devices=devices, strategy=strategy,
                              model=config_model, data={"shuffle": False})
        run_fit(config)
        runs[name] = {key: train_losses(tmp_path / name, key) for key in ("train/loss", "train/distill_loss")}
    for key in ("train/loss", "train/distill_loss"):
        for parallel in ("kd_ddp", "kd_fsdp"):
            assert_losses_close(runs[parallel][key], runs["kd_one"][key], range(STEPS), tol=1e-5)
    distill = runs["kd_one"]["train/distill_loss"]
    assert distill[STEPS - 1] < distill[0]  # the student moves towards the teacher


def _callbacks(base):
    import yaml
    return yaml.safe_load(base.read_text())["trainer"]["callbacks"]


@pytest.mark.slow
def test_expert_parallel_fsdp_equals_ddp_and_exports(setup, ddp, tmp_path):
    """EP(2) inside FSDP2 from YAML (each rank holds half the routed experts, all-to-all dispatch) trains like DDP
    on the same mixed-modality ranks, and its sharded checkpoint exports to the full model."""
    tmp, base, _ = setup
    ddp_dir, ddp_losses = ddp
    model = {**MODEL, "parallel": {"data_parallel": "fsdp", "expert_parallel_size": 2}}
    config = scale_config(base, tmp / "ep", batch_size=4, devices=2, strategy=FSDP, model=model,
                          data={"shuffle": False})
    run_fit(config)
    assert_losses_close(train_losses(tmp / "ep"), ddp_losses, range(STEPS), tol=1e-5)
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(tmp / "ep" / "checkpoints" / "last.ckpt"), "--output", str(out)]) == 0
    exported, _ = MultimodalR1.from_pretrained(out)
    reference, _ = model_from_checkpoint(ddp_dir / "checkpoints" / "last.ckpt")
    for (name, a), (_, b) in zip(exported.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_tensor_parallel_from_yaml_equals_one_process(setup):
    """TP(2) x FSDP2 through FSDPStrategy (both ranks share each batch, heads split across them) trains like one
    process on the same mixed-modality batches."""
    tmp, base, _ = setup
    model = {"backbone": {"n_kv_heads": 2, "moe": MODEL["backbone"]["moe"]}}  # KV heads must split over 2 ranks
    one = scale_config(base, tmp / "tp_one", batch_size=8, model=model, data={"shuffle": False})
    run_fit(one)
    tp_model = {**model, "parallel": {"data_parallel": "fsdp", "tensor_parallel_size": 2}}
    tp = scale_config(base, tmp / "tp", batch_size=8, devices=2, strategy=FSDP, model=tp_model,
                      data={"shuffle": False})
    run_fit(tp)
    assert_losses_close(train_losses(tmp / "tp"), train_losses(tmp / "tp_one"), range(STEPS), tol=1e-5)


@pytest.mark.slow
def test_fit_destroys_its_process_group_before_the_interpreter_exits(setup):
    """`mmr1 fit` under a distributed strategy ends with no process group and no gloo worker thread left: a worker
    still releasing the last collective's work during interpreter finalization aborts the process after a
    successful run (see `mmr1.cli.close_process_group`). One DDP rank in a subprocess, so the threads can be read
    after `main` returns."""
    tmp, base, _ = setup
    config = scale_config(base, tmp / "ddp_one", batch_size=4, strategy="ddp", trainer={"max_steps": 2})
    script = ("import os, sys; import torch.distributed as dist; from mmr1.cli import main\n"
              "rc = main(['fit', '--config', sys.argv[1]])\n"
              "names = [open(f'/proc/self/task/{t}/comm').read().strip() for t in os.listdir('/proc/self/task')]\n"
              "print('RESULT', rc, dist.is_initialized(), sorted(n for n in names if 'gloo' in n or 'tcpstore' in n))")
    proc = run_python("-c", script, config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESULT 0 False []" in proc.stdout, proc.stdout[-2000:]
