"""`pixart train` on tiny configs: it learns, resumes exactly, runs the same on 2 processes, saves loadable folders."""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pixart.cli import main
from pixart.configs import SchedulerConfig, TransformerConfig
from pixart.models.transformer import PixArtTransformer2DModel
from pixart.train.diffusion import Schedule, training_losses, variational_bound
from pixart.train.loop import TrainOptions, Trainer, train
from pixart.train.model import EMA

WEIGHTS = "diffusion_pytorch_model.safetensors"


def write_features(root: Path, n: int = 4, caption_dim: int = 32, sizes: tuple = ((8, 8),), seed: int = 0,
                   max_length: int = 16) -> Path:
    """A features folder in the documented on-disk format, written by hand: n items per bucket size (latent h, w)."""
    g = torch.Generator().manual_seed(seed)
    (root / "shards").mkdir(parents=True)
    (root / "items").mkdir()
    index = {"format": "pixart-features", "version": 1, "max_length": max_length, "caption_dim": caption_dim,
             "latent_channels": 4, "vae_scale_factor": 8, "scaling_factor": 0.18215, "resolution": 64,
             "model": "hand-written", "encoder": "hand-written"}
    (root / "index.json").write_text(json.dumps(index))
    tensors, lines = {}, []
    for h, w in sizes:
        for i in range(n):
            key, tokens = f"img-{h}x{w}-{i}.png", 2 + i % 3
            tensors[f"{key}/caption"] = torch.randn(tokens, caption_dim, generator=g)
            tensors[f"{key}/mean"] = torch.randn(4, h, w, generator=g) * 4
            tensors[f"{key}/std"] = torch.rand(4, h, w, generator=g) * 0.1
            lines.append({"id": key, "prompt": f"item {i}", "height": 8 * h, "width": 8 * w, "bucket": [8 * h, 8 * w],
                          "shard": "shards/rank0-00000.safetensors", "tokens": tokens})
    save_file(tensors, root / "shards" / "rank0-00000.safetensors")
    save_file({"caption": torch.randn(1, caption_dim, generator=g), "mask": torch.ones(1, dtype=torch.int64)},
              root / "null.safetensors")
    (root / "items" / "rank0.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def tiny_config(path: Path, out_channels: int = 8) -> Path:
    """2 layers, width 32 (2 heads of 16), captions of 32, no micro-conditions."""
    TransformerConfig(sample_size=8, num_attention_heads=2, attention_head_dim=16, num_layers=2, out_channels=out_channels,
                      cross_attention_dim=32, caption_channels=32).save(path)
    return path


def run(tmp_path: Path, name: str, **kw) -> Path:
    """train() in this process with test defaults: tiny config, fp32, no warm-up, a loose clip."""
    options = dict(features=str(tmp_path / "features"), output=str(tmp_path / name), config=str(tmp_path / "config.json"),
                   batch_size=2, lr=1e-3, warmup_steps=0, grad_clip=1.0, mixed_precision="no", device="cpu", log_every=1)
    return train(TrainOptions(**{**options, **kw}))


def log_records(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a busy machine: OpenMP's thread handoffs cost 20x the arithmetic; one thread is fastest."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny(tmp_path) -> Path:
    write_features(tmp_path / "features", sizes=((8, 8), (4, 8)))
    tiny_config(tmp_path / "config.json")
    return tmp_path


def test_loss_falls_when_overfitting_one_batch(tmp_path):
    write_features(tmp_path / "features", n=2)
    tiny_config(tmp_path / "config.json")
    out = run(tmp_path, "run", max_steps=40, lr=3e-3, caption_dropout=0.0, ema_decay=0.0)
    losses = [r["loss"] for r in log_records(out)]
    assert len(losses) == 40
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)  # timesteps and noise vary each step, so compare 10-step means
    assert all(math.isfinite(x) for x in losses)


def test_resumed_run_ends_with_identical_weights(tiny):
    """3 steps + checkpoint, then a resumed run to 7 steps, equals 7 steps at once (crossing epochs, dropout on)."""
    common = dict(caption_dropout=0.5, ema_decay=0.9, seed=3)
    whole = run(tiny, "whole", max_steps=7, **common)
    first = run(tiny, "split", max_steps=3, checkpoint_every=3, **common)
    assert (first / "checkpoints" / "step-00000003" / "state.pt").is_file()
    code = main(["train", str(tiny / "features"), "-o", str(first), "--config", str(tiny / "config.json"),
                 "--batch-size", "2", "--lr", "1e-3", "--warmup-steps", "0", "--grad-clip", "1.0",
                 "--mixed-precision", "no", "--device", "cpu", "--caption-dropout", "0.5", "--ema-decay", "0.9",
                 "--seed", "3", "--max-steps", "7", "--resume", "auto", "--checkpoint-every", "2",
                 "--keep-checkpoints", "1", "--log-every", "1"])
    assert code == 0
    for name in (WEIGHTS, "diffusion_pytorch_model.raw.safetensors"):
        a, b = load_file(whole / "transformer" / name), load_file(first / "transformer" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    ema, raw = (load_file(whole / "transformer" / n) for n in (WEIGHTS, "diffusion_pytorch_model.raw.safetensors"))
    assert not torch.equal(ema["proj_out.weight"], raw["proj_out.weight"])
    assert [p.name for p in (first / "checkpoints").iterdir()] == ["step-00000006"]  # keep 1
    assert [r["step"] for r in log_records(first)] == list(range(1, 8))


def test_max_time_stops_with_a_checkpoint_that_resumes_exactly(tiny, monkeypatch):
    """A clock that advances 1 s per reading: --max-time 3.5 stops after 3 steps (the 4th reading), writes a
    checkpoint (none was due) and the model; resuming to 7 steps equals 7 steps at once."""
    common = dict(caption_dropout=0.5, ema_decay=0.9, seed=3)
    whole = run(tiny, "whole", max_steps=7, **common)
    readings = iter(range(1000))
    monkeypatch.setattr("pixart.train.loop.monotonic", lambda: next(readings))
    first = run(tiny, "split", max_time=3.5, checkpoint_every=0, **common)
    assert [p.name for p in (first / "checkpoints").iterdir()] == ["step-00000003"]
    assert (first / "transformer" / WEIGHTS).is_file()
    run(tiny, "split", max_steps=7, resume="auto", **common)
    a, b = load_file(whole / "transformer" / WEIGHTS), load_file(first / "transformer" / WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_max_time_reads_durations_and_refuses_bad_ones(capsys):
    from pixart.cli import duration

    assert [duration(t) for t in ("90", "90s", "45m", "1.5h", "2H", "3h55m", "1m30s")] == [
        90, 90, 2700, 5400, 7200, 14100, 90]
    for bad in ("soon", "-5m", "0", "5 minutes", "h"):
        with pytest.raises(argparse.ArgumentTypeError, match="duration"):
            duration(bad)
    with pytest.raises(SystemExit):
        main(["train", "features", "-o", "out", "--max-time", "ten minutes"])
    assert "not a duration: write 90s, 45m, 2h or 3h55m" in capsys.readouterr().err


def test_gradient_accumulation_takes_the_same_steps_in_micro_batches(tiny, monkeypatch):
    """Batches of 4 as 4 micro-batches of 1 (activations of 1 item at a time) end where whole batches end, up to
    float rounding of the summed gradients (the bounds of the two-process test, which sums the same way)."""
    same = dict(batch_size=4, grad_clip=0.5, warmup_steps=2, max_steps=4, ema_decay=0.5, seed=1)
    whole_run = run(tiny, "whole", **same)
    calls, original = [], Trainer._forward_backward

    def counted(self, inputs, global_batch):
        calls.append(len(inputs["t"]))
        return original(self, inputs, global_batch)

    monkeypatch.setattr(Trainer, "_forward_backward", counted)
    micro = run(tiny, "micro", gradient_accumulation_steps=4, **same)
    assert calls == [1] * 16  # 4 steps of 4 micro-batches of 1
    a, b = load_file(whole_run / "transformer" / WEIGHTS), load_file(micro / "transformer" / WEIGHTS)
    for k in a:
        atol = 1e-3 * 4 if k.endswith("to_k.bias") else 1e-5
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=atol, msg=k)
    assert [r["loss"] for r in log_records(micro)] == pytest.approx([r["loss"] for r in log_records(whole_run)],
                                                                     abs=1e-5)
    with pytest.raises(ValueError, match=r"share of the batch \(4 of --batch-size 4\).*at most 4"):
        run(tiny, "bad", gradient_accumulation_steps=5, **same)


def test_resume_refuses_changed_batch_size_and_unasked_restart(tiny, capsys):
    out = run(tiny, "run", max_steps=2, checkpoint_every=2)
    with pytest.raises(ValueError, match="--resume auto"):
        run(tiny, "run", max_steps=4)
    with pytest.raises(ValueError, match=r"--batch-size \(2, now 4\)"):
        run(tiny, "run", max_steps=4, batch_size=4, resume="auto")
    with pytest.raises(FileNotFoundError, match="no state.pt"):
        run(tiny, "run", max_steps=4, resume=str(out / "nowhere"))


def test_ema_update_formula_and_swap():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = EMA({"p": p}, decay=0.75)
    with torch.no_grad():
        p.copy_(torch.tensor([5.0, -2.0]))
    ema.update()
    assert torch.equal(ema.shadow["p"], torch.tensor([0.75 * 1 + 0.25 * 5, 0.75 * 2 + 0.25 * -2]))
    with ema.applied():
        assert torch.equal(p.detach(), ema.shadow["p"])
    assert torch.equal(p.detach(), torch.tensor([5.0, -2.0]))


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "ddp-accumulate", "fsdp-accumulate"])
def test_two_processes_match_one(tiny, mode):
    """torchrun with 2 gloo ranks, each half of every global batch, ends where 1 process ends (DDP or FSDP2; with
    gradient accumulation each rank runs its half as 2 micro-batches, exchanging gradients after the second)."""
    args = ["train", str(tiny / "features"), "-o", str(tiny / "two"), "--config", str(tiny / "config.json"),
            "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "2", "--grad-clip", "0.5", "--mixed-precision", "no",
            "--device", "cpu", "--max-steps", "4", "--ema-decay", "0.5", "--seed", "1", "--log-every", "1",
            "--checkpoint-every", "2", *(["--fsdp"] if mode.startswith("fsdp") else []),
            *(["--gradient-accumulation-steps", "2"] if mode.endswith("accumulate") else [])]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "pixart", *args],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"({mode.split('-')[0].upper()}, 2 x cpu, float32)" in done.stdout
    same = dict(batch_size=4, grad_clip=0.5, warmup_steps=2, max_steps=4, ema_decay=0.5, seed=1)
    one = run(tiny, "one", **same)
    # one process continuing the 2-process run from its step-2 checkpoint (whole tensors, gathered under FSDP)
    resumed = run(tiny, "resumed", resume=str(tiny / "two" / "checkpoints" / "step-00000002"), **same)
    a = load_file(one / "transformer" / WEIGHTS)
    for other in (tiny / "two", resumed):
        b = load_file(other / "transformer" / WEIGHTS)
        for k in a:
            # Gradients summed over two half batches differ from one batch's in float rounding only, which moves the
            # weights by far less than one Adam step (lr). Except the key biases: softmax ignores a shift common to
            # all keys, so their exact gradient is 0 and Adam turns rounding noise of either sign into steps of ~lr.
            atol = 1e-3 * 4 if k.endswith("to_k.bias") else 1e-5
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=atol, msg=f"{other.name}: {k}")
    logs = log_records(one), log_records(tiny / "two")
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] == [1, 2, 3, 4]
    assert [r["loss"] for r in logs[1]] == pytest.approx([r["loss"] for r in logs[0]], abs=1e-5)  # all-reduced mean


def test_trained_folder_loads_in_diffusers_and_pixart(pipeline_dir_512, tmp_path):
    from diffusers import PixArtAlphaPipeline as DiffusersPipeline

    import pixart

    write_features(tmp_path / "features")
    out = train(TrainOptions(features=str(tmp_path / "features"), output=str(tmp_path / "out"),
                             model=str(pipeline_dir_512), batch_size=2, max_steps=2, mixed_precision="no", device="cpu"))
    theirs = DiffusersPipeline.from_pretrained(out).transformer.eval()
    ours = pixart.PixArtAlphaPipeline.from_pretrained(out).transformer
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    mask, t = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]), torch.tensor([10, 900])
    with torch.no_grad():
        expected = theirs(x, encoder_hidden_states=y, encoder_attention_mask=mask, timestep=t,
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        got = ours(x, t, y, mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # fp32, two implementations of one function
    trained = load_file(out / "transformer" / WEIGHTS)
    original = load_file(pipeline_dir_512 / "transformer" / WEIGHTS)
    assert not torch.equal(trained["proj_out.weight"], original["proj_out.weight"])
    raw = PixArtTransformer2DModel.from_pretrained(out, subfolder="transformer", variant="raw")
    assert sorted(raw.state_dict()) == sorted(trained)


def test_sample_images_are_written(pipeline_dir_512, tmp_path):
    write_features(tmp_path / "features")
    out = train(TrainOptions(features=str(tmp_path / "features"), output=str(tmp_path / "out"),
                             model=str(pipeline_dir_512), batch_size=2, max_steps=4, sample_every=2,
                             sample_prompts=("a red circle", "a blue square"), sample_steps=2, sample_size=64,
                             mixed_precision="no", device="cpu"))
    names = sorted(p.name for p in (out / "samples").iterdir())
    assert names == [f"step-0000000{s}-{k}.png" for s in (2, 4) for k in (0, 1)]


def test_vb_term_equals_a_direct_computation():
    """The KL of the true posterior to the model's at t > 0 from the DDPM formulas and torch.distributions."""
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000)
    schedule = Schedule.from_config(SchedulerConfig())
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    eps, v = torch.randn(3, 4, 4, 4, generator=g), torch.rand(3, 4, 4, 4, generator=g) * 2 - 1
    t = torch.tensor([1, 500, 999])
    x_t = schedule.add_noise(x0, noise, t)
    got = variational_bound(schedule, eps, v, x0, x_t, t)
    for i, step in enumerate(t.tolist()):
        ac, ac_prev, beta = (ddpm.alphas_cumprod[step].double(), ddpm.alphas_cumprod[step - 1].double(),
                             ddpm.betas[step].double())
        xt, x0i = x_t[i].double(), x0[i].double()
        true_mean = (ac_prev.sqrt() * beta * x0i + (1 - beta).sqrt() * (1 - ac_prev) * xt) / (1 - ac)
        true_var = beta * (1 - ac_prev) / (1 - ac)
        pred_x0 = (xt - (1 - ac).sqrt() * eps[i].double()) / ac.sqrt()
        model_mean = (ac_prev.sqrt() * beta * pred_x0 + (1 - beta).sqrt() * (1 - ac_prev) * xt) / (1 - ac)
        frac = (v[i].double() + 1) / 2
        model_var = torch.exp(frac * beta.log() + (1 - frac) * true_var.log())
        kl = torch.distributions.kl_divergence(torch.distributions.Normal(true_mean, true_var.sqrt()),
                                               torch.distributions.Normal(model_mean, model_var.sqrt()))
        # float32 against float64; the KL at t = 1 is a difference of nearly equal terms
        torch.testing.assert_close(got[i].double(), kl.mean() / math.log(2), rtol=1e-3, atol=1e-5)


def test_vb_trains_only_the_variance_and_4_channels_give_mse_only():
    schedule = Schedule.from_config(SchedulerConfig())
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    t = torch.tensor([0, 300])
    x_t = schedule.add_noise(x0, noise, t)
    out = torch.randn(2, 8, 4, 4, generator=g, requires_grad=True)
    losses = training_losses(schedule, out, x0, noise, x_t, t)
    losses["vb"].sum().backward()
    assert torch.all(out.grad[:, :4] == 0) and torch.all(out.grad[:, 4:].abs().sum((1, 2, 3)) > 0)
    assert torch.all(torch.isfinite(losses["vb"])) and torch.equal(losses["loss"], losses["mse"] + losses["vb"])
    only_eps = training_losses(schedule, out[:, :4].detach(), x0, noise, x_t, t)
    assert torch.equal(only_eps["loss"], only_eps["mse"]) and torch.equal(only_eps["mse"], losses["mse"].detach())


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    model = PixArtTransformer2DModel(TransformerConfig.from_json(tiny_config(tmp_path / "c.json")))
    g = torch.Generator().manual_seed(0)
    x, y, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 32, generator=g), torch.tensor([1, 700])
    grads = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        model(x, t, y).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))  # the same ops recomputed on the CPU: bit-identical


def test_bad_options_name_the_fix(tiny):
    with pytest.raises(ValueError, match="--model PIPELINE_FOLDER to fine-tune, or --config"):
        train(TrainOptions(features=str(tiny / "features"), output=str(tiny / "o"), max_steps=1))
    with pytest.raises(ValueError, match="--max-steps N, --epochs N or --max-time DURATION"):
        train(TrainOptions(features=str(tiny / "features"), output=str(tiny / "o"), config=str(tiny / "config.json")))
    TransformerConfig(sample_size=8, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                      cross_attention_dim=32, caption_channels=64).save(tiny / "wide.json")
    with pytest.raises(ValueError, match="32-wide captions but the transformer takes 64"):
        run(tiny, "o", max_steps=1, config=str(tiny / "wide.json"))
    with pytest.raises(ValueError, match="--sample-every needs --sample-prompts"):
        run(tiny, "o", max_steps=1, sample_every=1)


def test_lora_saved_and_loaded_by_the_pipeline_reproduces_the_trained_model(pipeline_dir_512, tmp_path):
    import pixart
    from safetensors import safe_open

    write_features(tmp_path / "features")
    options = TrainOptions(features=str(tmp_path / "features"), output=str(tmp_path / "out"),
                           model=str(pipeline_dir_512), batch_size=2, max_steps=3, lr=1e-2, warmup_steps=0,
                           grad_clip=1.0, mixed_precision="no", device="cpu", lora_rank=4, lora_alpha=8,
                           lora_targets=("to_q", "to_v", "ff.net.2"))
    trainer = Trainer(options)
    trainer.run()
    path = tmp_path / "out" / "pytorch_lora_weights.safetensors"
    state = load_file(path)
    assert len(state) == 2 * 5 * 2  # 2 blocks × {attn1, attn2}.{to_q, to_v} and ff.net.2 × (A, B)
    assert state["transformer.transformer_blocks.0.attn1.to_q.lora_B.weight"].abs().sum() > 0  # B starts at 0
    with safe_open(path, "pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    assert (config["transformer.r"], config["transformer.lora_alpha"]) == (4, 8)
    assert not (tmp_path / "out" / "transformer").exists()  # a LoRA run writes the adapter only

    pipe = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512)
    base = pipe.transformer
    g = torch.Generator().manual_seed(0)
    x, y, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g), torch.tensor([10, 900])
    with torch.no_grad():
        before = base(x, t, y)
        pipe.load_lora_weights(path)
        loaded, trained = pipe.transformer(x, t, y), trainer.model.eval()(x, t, y)
    torch.testing.assert_close(loaded, trained, rtol=0, atol=1e-6)  # same weights, same ops: equal up to rounding
    assert not torch.allclose(loaded, before, atol=1e-4)


def test_epochs_end_the_run_and_the_last_steps_are_logged(tiny):
    out = run(tiny, "run", epochs=2, log_every=3)  # 2 buckets of 4 items, batches of 2: 4 steps per epoch
    assert [(r["step"], r["epoch"]) for r in log_records(out)] == [(3, 0), (6, 1), (8, 2)]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_fp32_weights(tiny, precision):
    """Autocast (fp16 with its gradient scaler) computes in low precision; the weights and EMA stay fp32."""
    out = run(tiny, precision, max_steps=3, mixed_precision=precision, gradient_checkpointing=True, ema_decay=0.5)
    assert all(math.isfinite(r["loss"]) for r in log_records(out))
    for name in (WEIGHTS, "diffusion_pytorch_model.raw.safetensors"):
        state = load_file(out / "transformer" / name)
        assert all(v.dtype == torch.float32 for v in state.values())
    assert not torch.equal(state["proj_out.weight"], torch.zeros_like(state["proj_out.weight"]))  # it trained


def folder_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_output_that_is_inside_or_holds_the_source_model_is_refused_before_training(tmp_path, capsys):
    """-o the --model folder itself (or through a symlink), a folder in it or one holding it: saving would overwrite
    the model (its transformer, and each hard-linked tokenizer / T5 file deleted before being linked to itself)."""
    import shutil

    from pixart import demo

    model = tmp_path / "models" / "mdl"
    shutil.copytree(demo.MODEL, model)
    write_features(tmp_path / "feats", caption_dim=64)  # the demo's T5 width: on its own this run would train
    (tmp_path / "link").symlink_to(model)
    before = folder_bytes(model)
    for output, relation in ((model, "is"), (tmp_path / "link", "is"), (model / "out", "is inside"),
                             (tmp_path / "models", "holds")):
        code = main(["train", str(tmp_path / "feats"), "--model", str(model), "-o", str(output), "--max-steps", "1",
                     "--batch-size", "2", "--device", "cpu", "--mixed-precision", "no"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert f"-o {output} {relation} the model folder of --model {model}: saving would overwrite" in err
        assert err.endswith("give an -o outside that folder (and not one above it)\n")
    assert folder_bytes(model) == before and not (model / "out").exists()


def test_saving_into_the_source_keeps_its_files_and_copy_failures_are_one_message(tmp_path):
    """save_trained's hard links of the source's components never delete a file that is the source (same inode);
    a file that cannot be linked or copied is one error naming it, not shutil's list of tuples."""
    from pixart.train.model import save_trained

    net = PixArtTransformer2DModel(TransformerConfig.from_json(tiny_config(tmp_path / "config.json")))
    source = tmp_path / "mdl"
    (source / "tokenizer").mkdir(parents=True)
    (source / "tokenizer" / "tokenizer.json").write_text('{"a": 1}')
    (source / "text_encoder").mkdir()
    (source / "text_encoder" / "model.safetensors").write_bytes(b"tens of GB")
    for output in (source, tmp_path / "alias"):  # the folder itself, and through a symlink
        if output != source:
            output.symlink_to(source)
        save_trained(net, None, output, str(source), None)
        assert (source / "tokenizer" / "tokenizer.json").read_text() == '{"a": 1}'
        assert (source / "text_encoder" / "model.safetensors").read_bytes() == b"tens of GB"
    out = tmp_path / "out"
    save_trained(net, None, out, str(source), None)
    assert (out / "text_encoder" / "model.safetensors").samefile(source / "text_encoder" / "model.safetensors")
    save_trained(net, None, out, str(source), None)  # again: the links of the first save stay
    assert (out / "tokenizer" / "tokenizer.json").samefile(source / "tokenizer" / "tokenizer.json")
    blocked = tmp_path / "blocked"
    (blocked / "tokenizer" / "tokenizer.json").mkdir(parents=True)  # a folder where a file must go
    with pytest.raises(OSError, match=r"the trained model is saved .*, but 1 file\(s\) of .*tokenizer could not be "
                                      r"linked or copied into .*blocked/tokenizer \(first: .*tokenizer.json: ") as e:
        save_trained(net, None, blocked, str(source), None)
    assert "[(" not in str(e.value) and "\n" not in str(e.value)


def test_a_finished_output_is_not_trained_over(tiny):
    """A second run into a folder holding a trained model (or LoRA) stops before training, unless it resumes it."""
    out = run(tiny, "tr7", max_steps=1)
    weights = (out / "transformer" / WEIGHTS).read_bytes()
    with pytest.raises(ValueError, match=r"-o .*tr7 already holds a trained model \(transformer\), which this run "
                                         "would overwrite: give another -o, or delete that folder to train again"):
        run(tiny, "tr7", max_steps=2, seed=5)
    with pytest.raises(ValueError, match="--resume auto finds no checkpoint there to continue: give another -o, "
                                         "or delete that folder"):
        run(tiny, "tr7", max_steps=2, seed=5, resume="auto")
    assert (out / "transformer" / WEIGHTS).read_bytes() == weights
    lora = run(tiny, "lora", max_steps=1, lora_rank=2)
    with pytest.raises(ValueError, match=r"already holds a trained model \(pytorch_lora_weights.safetensors\)"):
        run(tiny, "lora", max_steps=1, lora_rank=2)
    with_checkpoint = run(tiny, "ckpt", max_steps=1, checkpoint_every=1)
    run(tiny, "ckpt", max_steps=2, resume="auto")  # continuing a run is allowed
    assert [r["step"] for r in log_records(with_checkpoint)] == [1, 2] and lora.is_dir()


def test_an_unwritable_or_full_output_is_refused_before_the_model_loads(tiny, monkeypatch):
    import errno
    import tempfile

    def not_loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr("pixart.train.loop.build_model", not_loaded)
    (tiny / "a-file").write_text("x")
    with pytest.raises(ValueError, match=r"-o .*a-file is a file, not a folder"):
        run(tiny, "a-file", max_steps=1)
    with pytest.raises(OSError, match=r"-o .*a-file/out cannot be created or written \(Not a directory\): give a "
                                      "folder on a writable file system"):
        run(tiny, "a-file/out", max_steps=1)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkstemp", read_only)
        with pytest.raises(OSError, match=r"-o .*ro cannot be created or written \(Read-only file system\)"):
            run(tiny, "ro", max_steps=1)
    monkeypatch.undo()

    class Usage:
        free = 1000

    monkeypatch.setattr("pixart.train.output.shutil.disk_usage", lambda path: Usage)
    with pytest.raises(OSError, match=r"-o .*full has 0.0 MB free, but the run writes about \d+\.\d MB there \(the "
                                      r"trained weights and their EMA, a checkpoint\): free some space"):
        run(tiny, "full", max_steps=1, checkpoint_every=1, ema_decay=0.5)
    assert not (tiny / "full" / "log.jsonl").exists()


@pytest.mark.parametrize("name, value, message", [
    ("lr", -1.0, "--lr must be a positive number, got -1.0"), ("lr", 0.0, "--lr must be a positive number"),
    ("lr", math.nan, "--lr must be a positive number"), ("lr", math.inf, "--lr must be a positive number"),
    ("adam_eps", 0.0, "--adam-eps must be a positive number"), ("lora_alpha", -2.0, "--lora-alpha must be a positive"),
    ("weight_decay", -0.1, "--weight-decay must be 0 .off. or a positive number"),
    ("grad_clip", math.nan, "--grad-clip must be 0 .off. or a positive number"),
    ("warmup_steps", -1, "--warmup-steps must be at least 0"), ("checkpoint_every", -5, "--checkpoint-every must be"),
    ("keep_checkpoints", -1, "--keep-checkpoints must be at least 0"), ("sample_every", -1, "--sample-every must"),
    ("lora_rank", -4, "--lora-rank must be at least 0"), ("threads", 0, "--threads must be at least 1"),
    ("sample_size", 0, "--sample-size must be at least 1"), ("sample_guidance", math.nan, "--sample-guidance must"),
    ("device", "gpu", "--device 'gpu' is not a device"),
])
def test_bad_numbers_name_their_flag(tiny, name, value, message):
    with pytest.raises(ValueError, match=message):
        run(tiny, "o", max_steps=1, **{name: value})
    assert not (tiny / "o").exists()  # refused before anything is written


def test_bad_learning_rate_on_the_command_line_and_sample_size_of_the_model(tiny, pipeline_dir_512, capsys):
    code = main(["train", str(tiny / "features"), "--config", str(tiny / "config.json"), "-o", str(tiny / "o"),
                 "--max-steps", "1", "--lr", "-1"])
    assert code == 2 and capsys.readouterr().err == "pixart: error: --lr must be a positive number, got -1.0\n"
    with pytest.raises(ValueError, match=r"--sample-size 40 must be a multiple of 16 px \(VAE factor 8 x patch size 2"):
        run(tiny, "o", max_steps=1, config=None, model=str(pipeline_dir_512), sample_every=1, sample_prompts=("x",),
            sample_size=40)
