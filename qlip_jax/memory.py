"""Device memory of jitted programs: micro-batches, gradient accumulation, XLA's own memory analysis.

Nothing here knows a model: these are the helpers every program (calibration, reconstruction, T2Q
labelling, Q2B, pretraining, sampling) uses to run a large batch in pieces and to ask XLA how much memory
one compiled step needs, so the same code answers for the embedded model and for SD v1.4.

* :func:`split_rows` / :func:`accumulate_value_and_grad`: a batch ``[B, ...]`` as ``n`` micro-batches
  ``[n, B / n, ...]`` under ``lax.scan``; gradients are summed in float32 and divided by ``n``, so for a
  loss that is a mean over equally sized row groups the result is the full-batch gradient (to float
  rounding) while only one micro-batch's activations are alive at a time. :func:`rows_value_and_grad`: the
  same for the gradient with respect to a per-row input (no sum across rows).
* :func:`peak_bytes`: the peak of a compiled program from ``compiled.memory_analysis()``
  (arguments + outputs + temporaries - donated/aliased), the figure ``--memory-budget`` compares.
* :func:`choose_micro_batch`: the largest divisor of the batch whose compiled step fits a budget.
* :func:`constant_bytes`: bytes of the literal constants of a lowered program (weights closed over by a
  jitted function show up here; they must be arguments).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

GIB = 2 ** 30


def check_micro_batch(batch: int, micro_batch: int | None, what: str = "batch") -> int:
    """Number of micro-batches of ``micro_batch`` rows in ``batch`` rows (None/0: one, the whole batch).

    Raises ValueError naming both sizes if ``micro_batch`` does not divide ``batch``.
    """
    if not micro_batch or micro_batch >= batch:
        return 1
    if micro_batch < 0 or batch % micro_batch:
        raise ValueError(f"--micro-batch {micro_batch} must be a positive divisor of the {what} ({batch} "
                         f"rows); divisors: {divisors(batch)}")
    return batch // micro_batch


def divisors(n: int) -> list[int]:
    """Positive divisors of ``n``, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


def split_rows(tree, n: int):
    """Every leaf ``[B, ...]`` -> ``[n, B / n, ...]`` (None leaves stay None)."""
    return jax.tree.map(lambda a: a.reshape((n, a.shape[0] // n) + a.shape[1:]), tree)


def accumulate_value_and_grad(fn: Callable, params, rows, n: int, has_aux: bool = False):
    """``value_and_grad(fn)(params, rows)`` computed over ``n`` equal micro-batches of ``rows``.

    ``fn(params, rows) -> loss`` (or ``(loss, aux)``) where ``rows`` is a pytree of ``[B, ...]`` arrays;
    the returned loss, aux and gradients are the means over the micro-batches (exactly the full-batch
    ones when the loss is a mean over the rows' groups). ``n = 1`` is the plain call.
    """
    vg = jax.value_and_grad(fn, has_aux=has_aux)
    if n == 1:
        return vg(params, rows)
    chunks = split_rows(rows, n)
    zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)

    def body(acc, chunk):
        out, g = vg(params, chunk)
        g = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, g)
        return g, out

    g, outs = jax.lax.scan(body, zeros, chunks)
    mean = lambda t: jax.tree.map(lambda a: jnp.mean(a, axis=0), t)  # noqa: E731
    g = jax.tree.map(lambda a, p: (a / n).astype(jnp.result_type(p)), g, params)
    return mean(outs), g


def rows_value_and_grad(fn: Callable, x, rows, n: int, has_aux: bool = False):
    """``value_and_grad(fn)(x, rows)`` with respect to a per-row input ``x [B, ...]``, over ``n`` equal
    micro-batches of ``(x, rows)``.

    ``fn(x, rows)`` is a mean over the rows (each row reading only its own ``x``); the returned value and
    aux are the means over the micro-batches and the gradient ``[B, ...]`` is the full-batch mean's (each
    micro-batch's gradient scaled by ``1 / n``). No sum across rows happens here. ``n = 1`` is the plain call.
    """
    vg = jax.value_and_grad(fn, has_aux=has_aux)
    if n == 1:
        return vg(x, rows)
    outs, g = jax.lax.map(lambda chunk: vg(*chunk), (split_rows(x, n), split_rows(rows, n)))
    g = jax.tree.map(lambda a: (a / n).reshape((-1,) + a.shape[2:]), g)
    return jax.tree.map(lambda a: jnp.mean(a, axis=0), outs), g


def peak_bytes(compiled) -> int:
    """Peak device memory of a compiled program by XLA's buffer analysis: arguments + outputs +
    temporaries - aliased (donated) bytes."""
    m = compiled.memory_analysis()
    if m is None:
        raise RuntimeError("this backend gives no memory analysis of compiled programs")
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def choose_micro_batch(compile_step: Callable[[int], object], batch: int, budget_gib: float,
                       candidates: Sequence[int] | None = None) -> tuple[int, int]:
    """The largest micro-batch (a divisor of ``batch``) whose compiled step fits ``budget_gib``.

    ``compile_step(micro_batch)`` returns the compiled step (e.g. ``jax.jit(f).lower(*abstract).compile()``).
    Divisors are tried from the largest down; returns ``(micro_batch, peak bytes)``. Raises ValueError if
    not even one row fits, naming the smallest peak.
    """
    budget = budget_gib * GIB
    peak = None
    for mb in sorted(candidates or divisors(batch), reverse=True):
        peak = peak_bytes(compile_step(mb))
        if peak <= budget:
            return mb, peak
    raise ValueError(f"--memory-budget {budget_gib} GiB: even a micro-batch of one row needs "
                     f"{peak / GIB:.2f} GiB; raise the budget or lower the resolution")


def constant_bytes(lowered) -> int:
    """Bytes held by the literal constants of a lowered (``jax.jit(f).lower(...)``) program: the sum over
    its ``stablehlo.constant`` ops (in every nested region) of elements x element width."""
    from jax._src.interpreters import mlir

    total = 0

    def walk(op):
        nonlocal total
        if op.operation.name == "stablehlo.constant":
            t = mlir.ir.RankedTensorType(op.operation.results[0].type)
            digits = "".join(ch for ch in str(t.element_type) if ch.isdigit())   # f32 -> 32, i1 -> 1
            total += int(np.prod(t.shape, dtype=np.int64)) * max(8, int(digits or 8)) // 8
        for region in op.operation.regions:
            for block in region.blocks:
                for inner in block.operations:
                    walk(inner)

    walk(lowered.compiler_ir("stablehlo").operation)
    return total
