"""cuda_graphs=True: the transformer's steps replayed as CUDA graphs (pixart.cuda_graphs). The dispatch (eager first
call, capture at the second, replays with the new inputs copied in, one graph per input signature, eager after a
failed capture) is checked on the CPU with a stand-in graph; the real graphs against eager on a GPU when there is one."""
from __future__ import annotations

import pytest
import torch

import pixart
from pixart.cuda_graphs import GraphedForward, signature

PROMPT = "a red circle on a white background"
SMALL = dict(height=128, width=128, use_resolution_binning=False, output_type="latent")


class Replay:
    """A stand-in for a captured graph: replay() runs the forward on the static inputs into the static output."""

    def __init__(self, forward, args, out):
        self.forward, self.args, self.out, self.replays = forward, args, out, 0

    def replay(self):
        self.out.copy_(self.forward(*self.args))
        self.replays += 1


class OnCpu(GraphedForward):
    """GraphedForward with CPU tensors and stand-in graphs, counting eager calls and captures."""

    def __init__(self, forward, fail=False):
        self.eager_calls, self.captures, self.fail, self.inner = 0, 0, fail, forward

        def counted(*args, **kwargs):
            self.eager_calls += 1
            return forward(*args, **kwargs)

        super().__init__(counted)

    @staticmethod
    def graphable(args, kwargs):
        return True

    def capture(self, args, kwargs):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captures += 1
        static = [a.clone() for a in args]
        out = torch.empty_like(args[0])  # a capture runs nothing: the output is allocated, not computed
        return Replay(self.inner, static, out), static, {}, out


@torch.no_grad()  # as the pipeline calls it
def test_first_call_eager_then_one_capture_then_replays_with_the_new_inputs():
    graphed = OnCpu(lambda x, t: x * t)
    x, t = torch.arange(4.0), torch.tensor(2.0)
    assert torch.equal(graphed(x, t), x * 2) and graphed.eager_calls == 1 and graphed.captures == 0
    outs = [graphed(x + i, torch.tensor(float(i))) for i in range(3)]  # captured once, replayed three times
    assert [o.tolist() for o in outs] == [((x + i) * i).tolist() for i in range(3)]
    assert graphed.captures == 1 and graphed.eager_calls == 1
    assert outs[0] is not outs[1] and outs[0].tolist() == [0.0] * 4  # each result is a copy, not the graph's output
    graphed(torch.ones(2, 4), t)  # another shape: its own first eager call, then its own graph
    graphed(torch.ones(2, 4), t)
    assert graphed.eager_calls == 2 and graphed.captures == 2 and len(graphed.graphs) == 2


@torch.no_grad()
def test_a_failed_capture_runs_eagerly_from_then_on(caplog):
    graphed = OnCpu(lambda x: x + 1, fail=True)
    x = torch.zeros(3)
    results = [graphed(x) for _ in range(4)]
    assert all(torch.equal(r, x + 1) for r in results) and graphed.eager_calls == 4
    assert graphed.failed and "capturing a CUDA graph" in caplog.text


@torch.no_grad()
def test_keyword_inputs_are_copied_by_name_whatever_their_order():
    graphed = OnCpu(lambda x, *, a, b: x * a + b)
    graphed.capture = lambda args, kwargs: (
        lambda static, skw, out: (Replay(lambda x: graphed.inner(x, **skw), static, out), static, skw, out))(
        [args[0].clone()], {k: v.clone() for k, v in kwargs.items()}, torch.empty_like(args[0]))
    x, one, two = torch.full((2,), 3.0), torch.tensor(1.0), torch.tensor(2.0)
    graphed(x, a=one, b=two)
    graphed(x, a=one, b=two)  # captured
    assert graphed(x, b=one, a=two).tolist() == [7.0, 7.0]  # 3·2 + 1; swapped by position it would be 3·1 + 2


def test_signature_tells_shapes_dtypes_and_values_apart():
    a, b = torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float16)
    assert signature((a,), {"m": a}) == signature((torch.ones(2, 3),), {"m": a})
    assert signature((a,), {}) != signature((b,), {}) != signature((a[:1],), {})
    assert signature((a, 1), {}) != signature((a, 2), {}) and signature((a,), {"m": a}) != signature((a, a), {})


def test_grad_mode_and_cpu_inputs_run_eagerly():
    calls = []
    graphed = GraphedForward(lambda x: calls.append(1) or x)
    with torch.no_grad():
        for _ in range(3):
            graphed(torch.zeros(2))  # CPU tensors: never captured
    with torch.enable_grad():
        graphed.graphable = lambda args, kwargs: True  # even where a graph could serve, autograd stays eager
        graphed(torch.zeros(2))
    assert len(calls) == 4 and not graphed.graphs and not graphed.seen


@pytest.fixture(scope="module")
def pipe(pipeline_dir_512):
    pipe = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(pipe, **kwargs):
    return pipe(PROMPT, num_inference_steps=6, generator=torch.Generator().manual_seed(0), **SMALL, **kwargs).images


def test_on_a_cpu_the_option_changes_nothing_and_bad_values_are_named(pipe):
    assert torch.equal(latents(pipe, cuda_graphs=True), latents(pipe))
    with pytest.raises(ValueError, match="True or False"):
        latents(pipe, cuda_graphs="yes")
    with pytest.raises(ValueError, match="does not combine with cache"):
        latents(pipe, cuda_graphs=True, cache="fast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("quantization", [None, "int8"])
def test_graphs_match_eager_on_a_gpu(pipeline_dir_512, quantization, monkeypatch):
    """Graphs are captured (one per batch size of the guidance interval) and replayed, and the latents match eager's
    to bf16 rounding: under capture cuBLAS may pick other kernels (another workspace), so not bit for bit. Bound:
    relative RMS 1e-2, the size of one bf16 rounding (2**-8 = 3.9e-3) carried through 6 steps."""
    captures = []
    capture = GraphedForward.capture
    monkeypatch.setattr(GraphedForward, "capture", lambda self, *a: captures.append(1) or capture(self, *a))
    pipe = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512, torch_dtype=torch.bfloat16,
                                                      transformer_quantization=quantization).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    for extra, graphs in (({}, 1), ({"guidance_interval": (0.28, 5.42)}, 2)):
        eager = latents(pipe, **extra).float()
        captures.clear()
        graphed = latents(pipe, cuda_graphs=True, **extra).float()
        error = float((graphed - eager).pow(2).mean().sqrt() / eager.pow(2).mean().sqrt())
        print(f"quantization={quantization} {extra}: relative RMS {error:.2e}, max {float((graphed - eager).abs().max()):.2e}")
        assert len(captures) == graphs and error < 1e-2
