"""Replay a UNet's denoising step from a CUDA graph instead of launching its kernels one by one.

At small batches an eager UNet step on a GPU is bound by its launches, not its arithmetic:
SD 1.5's UNet with capture issues about a thousand kernels per step, each costing
microseconds of Python, dispatcher and driver work, so a one-image step takes several
times the GPU time it needs (on an H100, a 20-step image ran 2.9 times faster replayed).
A CUDA graph records the step's kernels once and launches them all with one call.

``graphed_unet(unet)`` shadows the UNet's ``forward`` for the block:
- the first call with given input shapes runs eagerly: it picks the kernels and allocates
  what the capture processors accumulate into (``AttentionStore``'s sums and counters);
- the second is recorded into a graph over static copies of its inputs, then replayed;
- every later call with those shapes copies its inputs into the static ones and replays.
A call the graph cannot stand for runs eagerly: other shapes (the graph is recorded again
for them), gradients, a host timestep, or any of the UNet's optional inputs (ControlNet
residuals, attention masks, ...), none of which a text-to-image pass sends.

With a compiled forward (``torch.compile`` of the UNet's, ``attention_mask.compile_unet``),
the graph records the compiled step's kernels instead of the eager ones. The first call
with new shapes still runs eagerly, so that what the capture processors allocate exists
before tracing (the trace then holds only in-place additions, the same for every pass);
the second runs the compiled forward unrecorded, which compiles it for these shapes and
loads its kernels, neither of which may happen inside a recording; the third is recorded.

Why replays are correct with capture on: every state a capture processor changes lives on
the device, so a replay changes it as the eager step did; the store's step count is kept
by a forward pre-hook, which runs on every call, replayed or not. A graph holds the
addresses of the tensors it read and wrote, so it is valid for one store only: it lives
for one ``with`` block, and the caller holds the UNet for that block.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

log = logging.getLogger("freemask.attention_mask.cuda_graphs")


class GraphedStep:
    """The UNet's forward, replayed from a CUDA graph where it can be (see the module docstring)."""

    def __init__(self, eager_forward: Callable[..., Any], compiled_forward: Callable[..., Any] | None = None
                 ) -> None:
        self._eager_forward = eager_forward
        # The forward the graph records, and how many calls at new shapes run before it is recorded.
        self._recorded_forward = compiled_forward or eager_forward
        self._warmups = 1 if compiled_forward is None else 2
        self._shapes: tuple[Any, ...] | None = None
        self._calls_at_shapes = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._output: torch.Tensor | None = None
        self.replays = 0
        self.captures = 0
        # Why recording failed (a host sync in some custom processor, say): the block then runs eagerly.
        self.failure: str | None = None

    def __call__(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor, *args: Any,
                 cross_attention_kwargs: dict[str, Any] | None = None, return_dict: bool = True,
                 **optional: Any) -> Any:
        graphable = (not args and not cross_attention_kwargs and not return_dict and self.failure is None
                     and all(value is None for value in optional.values()) and not torch.is_grad_enabled()
                     and isinstance(timestep, torch.Tensor) and timestep.device == sample.device)
        if not graphable:
            return self._eager_forward(sample, timestep, encoder_hidden_states, *args,
                                       cross_attention_kwargs=cross_attention_kwargs, return_dict=return_dict,
                                       **optional)
        shapes = tuple((tensor.shape, tensor.dtype, tensor.device) for tensor in (sample, timestep,
                                                                                  encoder_hidden_states))
        if shapes != self._shapes:  # new shapes: warm up again, then record
            self.release()
            self._shapes = shapes
        if self._calls_at_shapes < self._warmups:
            self._calls_at_shapes += 1
            if self._calls_at_shapes == 1:
                return self._eager_forward(sample, timestep, encoder_hidden_states, return_dict=False)
            # The compiled forward's first call at these shapes compiles them: a pause worth naming in the log.
            started = time.perf_counter()
            output = self._recorded_forward(sample, timestep, encoder_hidden_states, return_dict=False)
            log.info("UNet step compiled for latents of shape %s in %.1f s", tuple(sample.shape),
                     time.perf_counter() - started)
            return output
        if self._graph is None:
            if not self._record(sample, timestep, encoder_hidden_states):
                return self._eager_forward(sample, timestep, encoder_hidden_states, return_dict=False)
        else:
            assert self._inputs is not None
            for static, new in zip(self._inputs, (sample, timestep, encoder_hidden_states)):
                static.copy_(new)
        assert self._graph is not None and self._output is not None
        self._graph.replay()
        self.replays += 1
        # A copy: the next replay overwrites the graph's output while the caller may still hold this one.
        return (self._output.clone(),)

    def _record(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> bool:
        inputs = (sample.clone(), timestep.clone(), encoder_hidden_states.clone())
        try:
            graph = torch.cuda.CUDAGraph()
            # torch.cuda.graph() empties the allocator's cache before it records, and that is what
            # hands back the memory of the graphs earlier passes recorded: an allocation that fails
            # while recording never frees cached memory (seen on an H100 without it: by bench_gpu's
            # 16-image passes, 56 GiB sat in the pools of graphs already dropped, and recording failed).
            # thread_local: CUDA work that another thread of the service launches meanwhile
            # cannot spoil the recording.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                output = self._recorded_forward(*inputs, return_dict=False)[0]
        except Exception as error:  # noqa: BLE001 - any failure to record means: run this block eagerly
            self.failure = f"{type(error).__name__}: {error}"
            log.warning("the UNet step could not be recorded as a CUDA graph; running it eagerly: %s", self.failure)
            return False
        self._graph, self._inputs, self._output = graph, inputs, output
        self.captures += 1
        return True

    def release(self) -> None:
        """Drop the graph and its memory pool; the next call warms up again."""
        self._graph = self._inputs = self._output = None
        self._shapes = None
        self._calls_at_shapes = 0


@contextmanager
def graphed_unet(unet: torch.nn.Module, compiled_forward: Callable[..., Any] | None = None
                 ) -> Iterator[GraphedStep | None]:
    """Run `unet`'s steps from CUDA graphs for the block; yields the GraphedStep (None: not on a GPU).

    `compiled_forward`: ``torch.compile`` of the UNet's own forward, recorded in its place.

    On a CPU this changes nothing. The UNet's own ``forward`` (or one an offloading hook put
    on the instance) is back in place on exit, also when the block raises.
    """
    if next(unet.parameters()).device.type != "cuda":
        yield None
        return
    instance_forward = unet.__dict__.get("forward")
    step = GraphedStep(unet.forward, compiled_forward)
    unet.forward = step  # an instance attribute: nn.Module.__call__ finds it before the class's method
    try:
        yield step
    finally:
        if instance_forward is None:
            del unet.forward
        else:
            unet.forward = instance_forward
        step.release()
