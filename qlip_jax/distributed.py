"""Processes, devices and meshes: the one module that knows about them.

Every program calls :func:`initialize` first and builds its mesh with :func:`mesh_from_arg` from
``--mesh data=N,fsdp=M``. Then the same code runs on one CPU, on a multi-GPU host and on a multi-host TPU
pod slice (one process per host, all running the same command):

* :func:`initialize` joins JAX's distributed runtime when the environment says there are several
  processes: ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID`` (any cluster), or
  ``QLIP_DISTRIBUTED=auto`` to let JAX detect a TPU pod or a SLURM job itself. One process: nothing.
* The mesh has two axes. ``data``: the batch is split over it, parameters are replicated. ``fsdp``: the
  batch is split over it too and each parameter is split along one axis (:func:`param_spec`), gathered
  by XLA where a layer needs it (fully sharded data parallelism). The quantizer state and the selector
  are small and always replicated.
* Arrays enter with :func:`put` (every process passes the same host value, each keeps its own shards)
  and leave with :func:`gather` (a host NumPy array on every process, ``process_allgather`` when the
  array spans other processes' devices). Files and progress bars belong to :func:`is_main`.

Rules are data: :data:`AXES` names the axes and :func:`param_spec` is the whole sharding policy.
"""

from __future__ import annotations

import os

import jax
import jax.numpy  # noqa: F401  (put_rows)
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qlip_jax.errors import BadArgument

#: Mesh axes, in mesh order: ``data`` (batch split, params replicated), ``fsdp`` (batch and params split).
AXES = ("data", "fsdp")

#: Parameters with fewer elements than this stay replicated on ``fsdp`` (biases, norms: splitting them
#: saves nothing and adds a gather per layer).
MIN_SHARDED_SIZE = 2 ** 14


def initialize() -> bool:
    """Join the distributed runtime if this run has several processes; True if it did.

    Reads ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``; or ``QLIP_DISTRIBUTED=auto`` (JAX's own TPU / SLURM / MPI detection). On CPU the
    collectives go through gloo. Safe to call twice.
    """
    if jax.distributed.is_initialized():
        return True
    auto = os.environ.get("QLIP_DISTRIBUTED", "").lower() == "auto"
    n = os.environ.get("JAX_NUM_PROCESSES")
    if not auto and (n is None or int(n) <= 1):
        return False
    if not auto:
        missing = [v for v in ("JAX_COORDINATOR_ADDRESS", "JAX_PROCESS_ID") if not os.environ.get(v)]
        if missing:
            raise BadArgument(f"JAX_NUM_PROCESSES={n} but {' and '.join(missing)} is not set",
                              "set JAX_COORDINATOR_ADDRESS=host:port and JAX_PROCESS_ID (0 .. N-1) in every process")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # configures the CPU backend only
    if auto:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], int(n), int(os.environ["JAX_PROCESS_ID"]))
    return True


def parse_mesh(text: str | None, devices: int) -> dict[str, int]:
    """``"data=2,fsdp=2"`` -> ``{"data": 2, "fsdp": 2}`` (every axis of :data:`AXES`, in order).

    ``None`` or ``""``: all ``devices`` on ``data``. An axis left out has size 1; one axis may be ``-1``
    (the rest of the devices). Raises :class:`BadArgument` (one line) for an unknown axis, a malformed
    entry or sizes whose product is not ``devices``.
    """
    sizes = {a: 1 for a in AXES}
    if not text:
        sizes["data"] = devices
        return sizes
    seen = set()
    for part in text.split(","):
        name, eq, value = part.strip().partition("=")
        if name not in AXES:
            raise BadArgument(f"--mesh {text}: unknown axis '{name}'", f"the axes are {', '.join(AXES)}, "
                              "e.g. --mesh data=2,fsdp=2")
        if not eq or name in seen:
            raise BadArgument(f"--mesh {text}: '{part.strip()}' is not AXIS=SIZE, once per axis",
                              "e.g. --mesh data=2,fsdp=2")
        try:
            size = int(value)
        except ValueError:
            size = 0
        if size < 1 and size != -1:
            raise BadArgument(f"--mesh {text}: the size of '{name}' must be a positive integer or -1, got '{value}'",
                              "e.g. --mesh data=2,fsdp=2")
        sizes[name] = size
        seen.add(name)
    if list(sizes.values()).count(-1) > 1:
        raise BadArgument(f"--mesh {text}: at most one axis may be -1", "e.g. --mesh data=-1,fsdp=2")
    known = int(np.prod([s for s in sizes.values() if s != -1]))
    for name, size in sizes.items():
        if size == -1:
            sizes[name] = devices // known if devices % known == 0 else 0
    product = int(np.prod(list(sizes.values())))
    if product != devices:
        raise BadArgument(f"--mesh {text} needs {product or 'a divisor of'} devices"
                          f"{'' if product else f' {devices} divisible by {known}'}, this run has {devices} "
                          f"({jax.process_count()} process(es))",
                          f"pick sizes whose product is {devices}, e.g. --mesh data={devices}")
    return sizes


def add_mesh_argument(parser) -> None:
    """``--mesh`` on a program's argument parser."""
    parser.add_argument("--mesh", default=None, metavar="data=N,fsdp=M",
                        help="device mesh over every process's devices: the batch is split over data x fsdp, the "
                             "UNet's params over fsdp (default: all devices on data)")


def make_mesh(sizes: dict[str, int]) -> Mesh:
    """A :class:`Mesh` over all devices of all processes with the axes of :data:`AXES` (JAX lays the
    devices out for the hardware's topology)."""
    shape = tuple(sizes.get(a, 1) for a in AXES)
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def mesh_from_arg(text: str | None, batch_invariant: bool = False) -> Mesh | None:
    """A program's mesh from ``--mesh``: :func:`parse_mesh` on every device of the run, then
    :func:`make_mesh`; None (no mesh) when ``--mesh`` is absent and this is the only process.
    ``batch_invariant``: the program's ``--batch-invariant``, which cannot be combined with a mesh."""
    if not text and jax.process_count() == 1:
        return None
    if batch_invariant:
        raise BadArgument("--batch-invariant samples one prompt at a time and cannot split a batch over --mesh",
                          "leave out one of them")
    return make_mesh(parse_mesh(text, jax.device_count()))


def batch_shards(mesh: Mesh) -> int:
    """How many parts the batch is split into: ``data x fsdp``."""
    return int(np.prod([mesh.shape.get(a, 1) for a in AXES]))


def check_rows(rows: int, mesh: Mesh | None, what: str) -> None:
    """Refuse, in one line and before any work, a row count that does not split over the mesh."""
    if mesh is None:
        return
    n = batch_shards(mesh)
    if rows % n:
        raise BadArgument(f"{what} is {rows}, which does not split over the mesh's {n} batch shards "
                          f"({' x '.join(f'{a}={mesh.shape.get(a, 1)}' for a in AXES)})",
                          f"use a multiple of {n}, or another --mesh")


def batch_spec(mesh: Mesh) -> PartitionSpec:
    """Rows over every mesh axis of :data:`AXES` the mesh has (``data`` and ``fsdp``)."""
    return PartitionSpec(tuple(a for a in AXES if a in mesh.axis_names))


def param_spec(shape: tuple[int, ...], fsdp: int) -> PartitionSpec:
    """Where one parameter lives: replicated on ``data``; on ``fsdp`` split along one axis that ``fsdp``
    divides: a conv kernel ``[kh, kw, I, O]`` on ``O``, a dense kernel ``[I, O]`` on its larger axis, any
    other array on its largest divisible axis; replicated if none divides or it is small
    (< :data:`MIN_SHARDED_SIZE` elements)."""
    if fsdp <= 1 or not shape or int(np.prod(shape)) < MIN_SHARDED_SIZE:
        return PartitionSpec()
    if len(shape) == 4:
        order = [3] + sorted(range(3), key=lambda a: -shape[a])
    else:
        order = sorted(range(len(shape)), key=lambda a: (-shape[a], -a))
    for axis in order:
        if shape[axis] % fsdp == 0:
            return PartitionSpec(*([None] * axis + ["fsdp"]))
    return PartitionSpec()


def param_shardings(tree, mesh: Mesh):
    """The :class:`NamedSharding` of every leaf of a parameter tree (arrays or ``ShapeDtypeStruct``)."""
    fsdp = mesh.shape.get("fsdp", 1)
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(tuple(np.shape(x)), fsdp)), tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def put(tree, shardings):
    """Host values (the same on every process) -> global arrays with ``shardings`` (one sharding or a
    matching tree); each process keeps its own shards. ``None`` leaves stay None."""
    return jax.device_put(tree, shardings)


def put_params(tree, mesh: Mesh):
    """A parameter tree (host or local arrays) placed by :func:`param_shardings`: split on ``fsdp``."""
    return put(tree, param_shardings(tree, mesh))


def put_rows(arrays: list, mesh: Mesh) -> list:
    """Batch arrays ``[B, ...]`` (or None) split over the mesh's batch shards, each padded to a multiple
    of them by repeating its last row (callers drop the padded rows of the results: ``[:B]``)."""
    shard = NamedSharding(mesh, batch_spec(mesh))
    pad = -arrays[0].shape[0] % batch_shards(mesh)

    def padded(a):
        return a if pad == 0 else jax.numpy.concatenate([a, jax.numpy.repeat(a[-1:], pad, axis=0)], axis=0)

    return [None if a is None else put(padded(a), shard) for a in arrays]


def gather(x) -> np.ndarray:
    """A global array -> host NumPy on every process (``process_allgather`` when it spans other processes)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:  # every device holds the whole value
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def agree(flag: bool) -> bool:
    """True if ``flag`` is true on every process (one process: ``flag``); e.g. whether every process found a
    cache, so that all skip, or all run, the collective work behind it."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.all(np.asarray(multihost_utils.process_allgather(np.asarray([bool(flag)])))))


def gather_turns(local: np.ndarray, total: int) -> np.ndarray:
    """Host results ``local [k, ...]`` of the items this process took when ``total`` items were dealt round
    robin (items ``process_index, process_index + processes, ...``) -> ``[total, ...]`` on every process,
    in item order (``process_allgather`` of host arrays; one process: ``local``)."""
    count = jax.process_count()
    if count == 1:
        return local
    from jax.experimental import multihost_utils

    per = -(-total // count)
    padded = np.zeros((per, *local.shape[1:]), local.dtype)
    padded[:len(local)] = local
    every = np.asarray(multihost_utils.process_allgather(padded))      # [processes, per, ...]
    return np.swapaxes(every, 0, 1).reshape((per * count, *local.shape[1:]))[:total]


def barrier(name: str) -> None:
    """Wait until every process reaches this point (no-op for one process), e.g. after process 0 wrote a
    file the others read."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def launch_local(argv: list[str], processes: int, devices: int, timeout: float = 900,
                 env: dict | None = None) -> list[tuple[int, str, str]]:
    """Run ``python argv`` as ``processes`` processes of one JAX run on this machine, ``devices`` CPU devices
    each, with a local coordinator on a free port (tests and benchmarks; a real cluster uses its own
    launcher). Returns ``[(returncode, stdout, stderr)]``; every process is killed on timeout."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    base = {**os.environ, **(env or {}), "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    if processes > 1:
        base.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(processes))
    procs = [subprocess.Popen([sys.executable, *argv], env={**base, "JAX_PROCESS_ID": str(i)}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(processes)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


def is_main() -> bool:
    """Process 0: the one that writes files and shows progress."""
    return jax.process_index() == 0
