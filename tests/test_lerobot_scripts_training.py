"""lerobot-train with LoRA (`--peft.*`) and with several processes (Accelerate, gloo on the CPU),
through LeRobot's unmodified scripts on the touch_block dataset (see test_lerobot_scripts.py)."""

import json
import os
import socket
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e_utils as e2e  # noqa: E402
from helpers import fixed_noise, noise_for  # noqa: E402

IMAGE_SIZE = 32
TB_REPO_ID = "local/touch_block"
ENV_KWARGS = {"observation_height": IMAGE_SIZE, "observation_width": IMAGE_SIZE}


def assert_ok(result: e2e.ScriptResult) -> None:
    assert result.returncode == 0, result.describe()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lerobot_training")


@pytest.fixture(scope="module")
def touch_block_dataset(workdir) -> Path:
    from lerobot_llava3d_fusion.demo.make_touch_block_dataset import make_touch_block_dataset

    root = workdir / "touch_block_dataset"
    make_touch_block_dataset(root, TB_REPO_ID, num_episodes=3, seed=0, height=IMAGE_SIZE, width=IMAGE_SIZE)
    return root


@pytest.fixture(scope="module")
def base_checkpoint(workdir, touch_block_dataset) -> Path:
    """A briefly trained policy (2 steps) to fine-tune from."""
    output_dir = workdir / "base_train"
    args = e2e.train_args(TB_REPO_ID, touch_block_dataset, output_dir, 2, log_freq=1, batch_size=4)
    assert_ok(e2e.run_lerobot("lerobot_train", args, workdir / "base_train.log"))
    return e2e.last_checkpoint(output_dir)


def predict(checkpoint: Path, noise: torch.Tensor, init_seed: int) -> torch.Tensor:
    observation = e2e.touch_block_observation(IMAGE_SIZE, IMAGE_SIZE, seed=7)
    return e2e.predict_like_lerobot_eval(
        checkpoint, "touch_block", ENV_KWARGS, observation, noise, init_seed
    )["chunk"]


# ---- LoRA ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lora_fine_tuning_trains_only_adapters_and_head_and_reloads(
    workdir, touch_block_dataset, base_checkpoint
):
    pytest.importorskip("peft")
    from safetensors import safe_open
    from safetensors.torch import load_file

    output_dir = workdir / "lora_train"
    args = [
        f"--policy.path={base_checkpoint}",
        f"--dataset.repo_id={TB_REPO_ID}",
        f"--dataset.root={touch_block_dataset}",
        "--dataset.depth_output_unit=m",
        "--policy.device=cpu",
        "--policy.push_to_hub=false",
        "--policy.optimizer_lr=3e-3",
        "--peft.method_type=LORA",  # no --peft.target_modules: the policy's defaults
        "--peft.r=4",
        "--batch_size=4",
        "--steps=3",
        "--log_freq=1",
        "--save_freq=3",
        "--num_workers=0",
        "--env_eval_freq=0",
        f"--output_dir={output_dir}",
        "--wandb.enable=false",
    ]
    result = e2e.run_lerobot("lerobot_train", args, workdir / "lora_train.log")
    assert_ok(result)
    assert "Wrapped llava3d_fusion with PEFT" in result.output
    losses = e2e.parse_train_losses(result.output)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(loss)) for _, loss in losses), losses

    checkpoint = e2e.last_checkpoint(output_dir)
    assert json.loads((checkpoint / "config.json").read_text())["use_peft"] is True
    assert not (checkpoint / "model.safetensors").exists()  # only what was trained is saved
    with safe_open(checkpoint / "adapter_model.safetensors", "pt") as adapter:
        keys = list(adapter.keys())
    assert any(".lora_A." in k for k in keys) and any(".lora_B." in k for k in keys), keys
    assert {k for k in keys if ".lora_" not in k} == {
        f"base_model.model.model.action_expert.{proj}.{param}"
        for proj in ("state_proj", "action_in_proj", "time_mlp_in", "time_mlp_out", "action_out_proj")
        for param in ("weight", "bias")
    }
    adapted = {k.split(".lora_")[0] for k in keys if ".lora_" in k}
    assert any("vlm_layers.0.self_attn.q_proj" in k for k in adapted)
    assert any("separate_expert_layers.0.mlp.down_proj" in k for k in adapted)

    # Reloaded as lerobot-eval loads it (base checkpoint + adapter): the same actions whatever the
    # RNG state, different from the base policy's (the adapter and head trained), base weights intact.
    config = json.loads((base_checkpoint / "config.json").read_text())
    noise = noise_for(config["chunk_size"], config["max_action_dim"], batch_size=1, seed=3)
    first, second = predict(checkpoint, noise, init_seed=0), predict(checkpoint, noise, init_seed=123)
    assert torch.equal(first, second)
    assert not torch.allclose(first, predict(base_checkpoint, noise, init_seed=0))

    from lerobot.configs import PreTrainedConfig
    from lerobot.envs.factory import make_env_config
    from lerobot.policies import make_policy

    cfg = PreTrainedConfig.from_pretrained(checkpoint)
    cfg.pretrained_path = checkpoint
    cfg.device = "cpu"
    loaded = make_policy(cfg=cfg, env_cfg=make_env_config("touch_block", **ENV_KWARGS))
    base = load_file(base_checkpoint / "model.safetensors")
    loaded_base = {
        k.replace("base_model.model.", "", 1).replace(".base_layer", "").replace(".original_module", ""): v
        for k, v in loaded.state_dict().items()
        if ".lora_" not in k and ".modules_to_save." not in k
    }
    assert base.keys() <= loaded_base.keys()
    for key, value in base.items():
        assert torch.equal(loaded_base[key], value), key


# ---- Streaming reader ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_streaming_training_reads_the_depth_in_millimetres_it_is_given(workdir, touch_block_dataset):
    """LeRobot 0.6.1's streaming reader returns depth maps in millimetres whatever
    --dataset.depth_output_unit says; --policy.dataset_depth_unit=mm reads them."""
    streaming = ["--dataset.streaming=true", "--num_workers=1", "--policy.geometry=depth"]
    refused_dir = workdir / "streaming_metres"
    args = e2e.train_args(TB_REPO_ID, touch_block_dataset, refused_dir, 2, log_freq=1, batch_size=4)
    result = e2e.run_lerobot("lerobot_train", [*args, *streaming], workdir / "streaming_metres.log")
    assert result.returncode != 0 and "--policy.dataset_depth_unit=mm" in result.output, result.describe()

    output_dir = workdir / "streaming_millimetres"
    args = e2e.train_args(TB_REPO_ID, touch_block_dataset, output_dir, 3, log_freq=1, batch_size=4)
    extra = [*streaming, "--policy.dataset_depth_unit=mm"]
    result = e2e.run_lerobot("lerobot_train", [*args, *extra], workdir / "streaming_millimetres.log")
    assert_ok(result)
    losses = e2e.parse_train_losses(result.output)
    assert [step for step, _ in losses] == [1, 2, 3] and all(
        torch.isfinite(torch.tensor(loss)) for _, loss in losses
    )

    # The checkpoint keeps the training unit, and acts on an environment's metres as lerobot-eval runs it.
    checkpoint = e2e.last_checkpoint(output_dir)
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["dataset_depth_unit"] == "mm"
    noise = noise_for(config["chunk_size"], config["max_action_dim"], batch_size=1, seed=3)
    assert torch.isfinite(predict(checkpoint, noise, init_seed=0)).all()


# ---- Several processes --------------------------------------------------------------------------------


@pytest.mark.slow
def test_accelerate_launch_two_processes_trains_and_the_checkpoint_loads(workdir, touch_block_dataset):
    output_dir = workdir / "ddp_train"
    launch = [
        sys.executable, "-m", "accelerate.commands.launch",
        # `--cpu` would start ONE process (Accelerate's simple launcher); `--multi_gpu` starts them
        # through torchrun, and lerobot-train's Accelerator(cpu=True) joins them with gloo.
        "--multi_gpu", "--num_processes=2", "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no",
        "--main_process_port=0",  # a free port (Accelerate's default, 29500, may be taken on a shared machine)
        "-m", "lerobot.scripts.lerobot_train",
        *e2e.train_args(TB_REPO_ID, touch_block_dataset, output_dir, 2, log_freq=1, batch_size=4),
    ]  # fmt: skip
    result = e2e.run_command(launch, workdir / "ddp_train.log", timeout=240)
    assert_ok(result)
    assert "Effective batch size: 4 x 2 = 8" in result.output
    losses = e2e.parse_train_losses(result.output)
    assert [step for step, _ in losses] == [1, 2], losses

    checkpoint = e2e.last_checkpoint(output_dir)
    config = json.loads((checkpoint / "config.json").read_text())
    noise = noise_for(config["chunk_size"], config["max_action_dim"], batch_size=1, seed=3)
    chunk = predict(checkpoint, noise, init_seed=0)
    assert chunk.shape == (1, config["chunk_size"], 3) and torch.isfinite(chunk).all()


def _ddp_rank(rank: int, world_size: int, port: int, results: Path) -> None:
    """One rank: LeRobot's training step under Accelerate (DDP, gloo), each rank on its own batch."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1",
    )  # fmt: skip
    torch.set_num_threads(1)
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    from helpers import preprocess, raw_batch, tiny_policy

    accelerator = Accelerator(
        cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]
    )
    policy = tiny_policy(seed=0)
    optimizer = policy.config.get_optimizer_preset().build(policy.get_optim_params())
    batch = preprocess(policy, raw_batch(2, seed=10 + rank))  # different data on each rank
    policy, optimizer = accelerator.prepare(policy, optimizer)
    before = torch.cat([p.detach().flatten() for p in accelerator.unwrap_model(policy).parameters()]).clone()
    for _ in range(2):
        policy.train()
        loss, _ = policy(batch)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    after = torch.cat([p.detach().flatten() for p in accelerator.unwrap_model(policy).parameters()])
    torch.save(
        {
            "distributed": accelerator.distributed_type.value,
            "before": before,
            "after": after,
            "loss": loss.item(),
        },
        results / f"rank{rank}.pt",
    )
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ranks_hold_the_same_weights_after_distributed_steps(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_rank, args=(2, port, tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(r["distributed"] == "MULTI_CPU" for r in ranks)
    assert ranks[0]["loss"] != ranks[1]["loss"]  # each rank saw its own batch ...
    assert not torch.equal(ranks[0]["after"], ranks[0]["before"])  # ... the weights moved ...
    assert torch.equal(ranks[0]["after"], ranks[1]["after"])  # ... identically on both ranks


def _fsdp_rank(rank: int, world_size: int, port: int, results: Path) -> None:
    """One rank: torch's FSDP2 (what Accelerate's fsdp_version=2 applies) over the policy's declared
    units, gloo on the CPU; one AdamW step on a batch every rank shares; rank 0 saves the full weights."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1",
    )  # fmt: skip
    torch.set_num_threads(1)
    import torch.distributed as dist
    from accelerate.utils.dataclasses import get_module_class_from_name
    from helpers import preprocess, raw_batch, tiny_policy
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo")
    policy = tiny_policy(seed=0)
    batch, noise, time = _fsdp_step_inputs(policy, preprocess, raw_batch)
    unit_classes = {get_module_class_from_name(policy, name) for name in policy._no_split_modules}
    units = [module for module in policy.modules() if type(module) in unit_classes]
    for module in units:
        fully_shard(module)
    fully_shard(policy)
    register_fsdp_forward_method(policy, "predict_action_chunk")
    sharded = sorted(n for n, p in policy.named_parameters() if isinstance(p, DTensor))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    policy.train()
    loss, _ = policy(batch, noise=noise, time=time)
    loss.backward()
    optimizer.step()
    full = {
        n: p.full_tensor() if isinstance(p, DTensor) else p.detach() for n, p in policy.named_parameters()
    }
    chunk = policy.predict_action_chunk(preprocess(policy, raw_batch(1)))
    if rank == 0:
        torch.save(
            {"units": len(units), "sharded": sharded, "full": full, "chunk": chunk}, results / "fsdp.pt"
        )
    dist.barrier()
    dist.destroy_process_group()


def _fsdp_step_inputs(policy, preprocess, raw_batch):
    return preprocess(policy, raw_batch(2, seed=10)), fixed_noise(policy, seed=4), torch.tensor([0.3, 0.7])


@pytest.mark.slow
def test_fsdp_over_the_declared_units_trains_like_one_process(tmp_path):
    from helpers import preprocess, raw_batch, tiny_policy

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_fsdp_rank, args=(2, port, tmp_path), nprocs=2, join=True)
    sharded = torch.load(tmp_path / "fsdp.pt", weights_only=True)

    reference = tiny_policy(seed=0)
    batch, noise, time = _fsdp_step_inputs(reference, preprocess, raw_batch)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    reference.train()
    loss, _ = reference(batch, noise=noise, time=time)
    loss.backward()
    optimizer.step()

    layers = len(reference.model.fusion.vlm_layers)
    assert sharded["units"] == 2 * layers  # every fused layer's MLP, LLM and expert
    # Every parameter is sharded: the MLPs in their own units, the rest in the root unit.
    assert sharded["sharded"] == sorted(n for n, _ in reference.named_parameters())
    for name, value in reference.named_parameters():
        torch.testing.assert_close(sharded["full"][name], value.detach(), atol=1e-5, rtol=1e-4, msg=name)
    assert sharded["chunk"].shape == (1, reference.config.chunk_size, 3)
