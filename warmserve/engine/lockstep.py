"""The ranks of a tensor-parallel instance stepping in lockstep over torch.distributed.

The leader (rank 0 of the group) owns the scheduler, the requests and sampling. Each step it
broadcasts what the forward needs, one int64 tensor (the new tokens, their positions and the
block tables: block ids are the leader's, and every rank's cache has the same blocks), and
every rank runs its shard of the forward, summing the row-parallel outputs with an all-reduce
after o_proj and after down_proj. A decode step of B sequences costs one broadcast (two when
the step's metadata exceeds `_INLINE` ints) and 2 × layers + 1 all-reduces.

Failures. Each forward makes exactly the sums `PagedLlama.sum_shapes` lists (2 × layers; 3 ×
layers for OLMo 2), so a rank whose forward raises (a bug, an allocation failure) makes the
sums it still owes with zeros of their shapes instead of leaving its peers
blocked in one, and then every rank takes part in one more sum saying which ranks failed. All
ranks thus agree that the step failed (`StepFailed`): the leader drops the step's requests and
reports them as it does on one device, and the followers wait for the next step, in sync. A
failure of the communication itself (a peer died, a timeout of the process group) cannot be
recovered: `TPBroken` is raised on every rank that sees it, and the instance must be torn
down (its process group too). A peer that hangs blocks its group until the process group's
timeout (set where the group is built), which then raises `TPBroken`.

Works with gloo (CPU) and NCCL (CUDA): the sums run on the model's device, the step headers
and status on the group's (`group_device`: the GPU for NCCL, the host for gloo). The NCCL path
is written for, not yet run on, a multi-GPU machine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from warmserve.engine.llama import PagedKVCache, PagedLlama, SeqInput
from warmserve.engine.tp import TPGroup

# The step header: kind, then the payload's length, then as much of it as fits.
_STEP, _STOP = 1, 2
_INLINE = 512


class TPBroken(RuntimeError):
    """The group's communication failed; the instance cannot go on."""


class StepFailed(RuntimeError):
    """A forward failed on some rank; every rank of the group raises this for the step."""

    def __init__(self, ranks: Sequence[int], cause: BaseException | None) -> None:
        self.ranks = tuple(ranks)
        self.cause = cause
        here = f": {type(cause).__name__} on this rank" if cause is not None else ""
        super().__init__(f"the forward failed on TP rank(s) {', '.join(map(str, self.ranks))}"
                         + here)  # fmt: skip


def tp_group(group: dist.ProcessGroup | None = None) -> TPGroup:
    """This process's place in a built process group (the default group if None)."""
    g = group if group is not None else dist.group.WORLD
    return TPGroup(dist.get_rank(g), dist.get_world_size(g), g, dist.get_global_rank(g, 0))


def group_device(tp: TPGroup) -> torch.device:
    """Where the group's tensors must lie: this process's GPU for NCCL, else the host."""
    if dist.get_backend(tp.group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree_num_blocks(tp: TPGroup, num_blocks: int) -> int:
    """The KV blocks every rank's cache holds (the fewest of any rank's): what the leader's
    block allocator may hand out. A collective: every rank calls it."""
    t = torch.tensor([num_blocks], dtype=torch.long, device=group_device(tp))
    _collective(lambda: dist.all_reduce(t, op=dist.ReduceOp.MIN, group=tp.group))
    return int(t.item())


def _collective(fn) -> None:
    try:
        fn()
    except Exception as e:  # the transport's own error types differ by backend
        raise TPBroken(f"tensor-parallel communication failed: {type(e).__name__}: {e}") from e


def encode(seqs: Sequence[SeqInput]) -> list[int]:
    """`[n, (start, tokens, blocks) * n, token ids..., block ids...]`."""
    out = [len(seqs)]
    for q in seqs:
        out += (q.start, len(q.token_ids), len(q.block_table))
    for q in seqs:
        out += q.token_ids
    for q in seqs:
        out += q.block_table
    return out


def decode(data: Sequence[int]) -> list[SeqInput]:
    n = data[0]
    heads = [data[1 + 3 * i : 4 + 3 * i] for i in range(n)]
    pos = 1 + 3 * n
    toks = []
    for _, nt, _ in heads:
        toks.append(tuple(data[pos : pos + nt]))
        pos += nt
    out = []
    for (start, _, nb), t in zip(heads, toks, strict=True):
        out.append(SeqInput(t, start, tuple(data[pos : pos + nb])))
        pos += nb
    return out


class Lockstep:
    """One rank's side of the lockstep: installs the all-reduce in the model, and runs steps."""

    def __init__(self, tp: TPGroup, model: PagedLlama, cache: PagedKVCache) -> None:
        self.tp = tp
        self.model = model
        self.cache = cache
        self.device = model.device  # where the sums run
        self.comm = group_device(tp)  # where the step headers and status go
        self.sums = 0  # all-reduces made in the current forward
        model.reduce = self._reduce

    def _reduce(self, t: torch.Tensor) -> None:
        _collective(lambda: dist.all_reduce(t, group=self.tp.group))
        self.sums += 1

    def _broadcast(self, t: torch.Tensor) -> None:
        _collective(lambda: dist.broadcast(t, src=self.tp.leader_global_rank, group=self.tp.group))

    # ----- the leader -------------------------------------------------------------------
    def lead(self, seqs: Sequence[SeqInput], rows: Sequence[int] | None) -> torch.Tensor:
        """Broadcast the step, run the leader's part; its logits (`StepFailed` if any rank
        failed)."""
        self._send(_STEP, encode(seqs))
        return self._run(seqs, rows, head=True)

    def stop(self) -> None:
        """Tell the followers to leave their loop."""
        self._send(_STOP, [])

    def _send(self, kind: int, payload: list[int]) -> None:
        head = torch.zeros(_INLINE + 2, dtype=torch.long)
        head[0], head[1] = kind, len(payload)
        inline = payload[:_INLINE]
        head[2 : 2 + len(inline)] = torch.tensor(inline, dtype=torch.long)
        self._broadcast(head.to(self.comm))
        if len(payload) > _INLINE:
            self._broadcast(torch.tensor(payload[_INLINE:], dtype=torch.long, device=self.comm))

    # ----- a follower -------------------------------------------------------------------
    def follow(self) -> bool:
        """Wait for the leader's next step and run this rank's part; False when told to stop.
        `StepFailed` when the step failed on some rank (this one stays in step)."""
        head = torch.empty(_INLINE + 2, dtype=torch.long, device=self.comm)
        self._broadcast(head)
        values = head.tolist()
        kind, n = values[0], values[1]
        if kind == _STOP:
            return False
        if kind != _STEP:
            raise TPBroken(f"unknown step header {kind}: the ranks are out of step")
        payload = values[2 : 2 + min(n, _INLINE)]
        if n > _INLINE:
            rest = torch.empty(n - _INLINE, dtype=torch.long, device=self.comm)
            self._broadcast(rest)
            payload += rest.tolist()
        self._run(decode(payload), None, head=False)
        return True

    # ----- every rank -------------------------------------------------------------------
    def _run(self, seqs: Sequence[SeqInput], rows: Sequence[int] | None, head: bool):
        self.sums = 0
        plan = self.model.sum_shapes(sum(len(q.token_ids) for q in seqs))
        error: Exception | None = None
        logits = None
        try:
            if head:
                logits = self.model.forward(seqs, self.cache, rows)
            else:
                self.model.forward_layers(seqs, self.cache)
        except TPBroken:
            raise
        except Exception as e:  # owe the peers the sums this forward did not make
            error = e
            for shape, dtype in plan[self.sums :]:
                self._reduce(torch.zeros(shape, dtype=dtype, device=self.device))
        if self.sums != len(plan):  # a bug: the ranks' collectives would not match
            raise TPBroken(f"a forward made {self.sums} sums, not {len(plan)}")
        failed = torch.zeros(self.tp.size, dtype=torch.long, device=self.comm)
        failed[self.tp.rank] = int(error is not None)
        _collective(lambda: dist.all_reduce(failed, group=self.tp.group))
        ranks = [r for r, f in enumerate(failed.tolist()) if f]
        if ranks:
            raise StepFailed(ranks, error) from error
        return logits
