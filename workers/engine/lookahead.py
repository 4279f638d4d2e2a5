"""One decode step of lookahead: the host work of step n+1 overlaps the GPU work of step n.

Without it a decode step is [host: build the batch, launch] → [GPU] → [host: wait, read the tokens, stop
rules], and the GPU idles during both host parts (0.2–0.7 ms a step on the H100 machines, against a 7–12 ms
step of the 8B shape at batch 64: workers/kernels/NOTES.md). With it, `Engine._decode_batch` launches the
NEXT step before it waits for the current one: the next step's input tokens are the current step's picks,
still on the device (a gather, no host round trip), its positions are one further, its batch is the running
batch as far as the host knows it. Then the host waits for the current step only, and applies the stop rules
while the GPU runs the next one.

What the host cannot know when it launches step n+1 is which requests step n's tokens stop (EOS, a stop
token). Those requests' rows in step n+1 are wasted work, never read (their positions are still inside their
KV reservations: a reservation holds prompt + max_tokens tokens and the last token read is at position
prompt + max_tokens − 2). The lookahead leaves out the requests certain to stop (max_tokens or the context
limit reached): no wasted row, and their blocks come back at once. A request that stops (or is aborted) while a
launched step still writes its KV holds its blocks until the engine has waited for that step
(`Launch.deferred`), so no block is handed to another request while the GPU may still write it.

Used only for all-greedy batches (sampling needs the logits on the host) and only while a launch can reuse the
step before's device tokens; any other batch first waits for the launch in flight (`Engine._retire`). Greedy
results are the same tokens as without lookahead: the same computation on the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from workers.engine.sequence import Sequence


@dataclass
class Launch:
    """A decode step launched on the device, not yet read by the host."""

    seqs: list[Sequence]  # its rows, in order
    positions: list[int]  # the position each row decodes (its input token's position)
    picks: torch.Tensor  # [rows] int64 on the device: each row's greedy token
    host: torch.Tensor  # the same on the host (pinned on CUDA, filled asynchronously)
    event: torch.cuda.Event | None  # recorded after the copy to `host`; None: already there (CPU)
    row_of: dict[int, int] = field(default_factory=dict)  # Sequence.serial → row
    deferred: list[list[int]] = field(default_factory=list)  # blocks freed while this step may write them
    _tokens: list[int] | None = None

    def __post_init__(self) -> None:
        self.row_of = {s.serial: i for i, s in enumerate(self.seqs)}

    def tokens(self) -> list[int]:
        """The rows' tokens; waits for this launch (not for any launched after it)."""
        if self._tokens is None:
            if self.event is not None:
                self.event.synchronize()
            self._tokens = self.host.tolist()
        return self._tokens

    def covers(self, seqs: list[Sequence]) -> bool:
        """Whether this launch decodes every one of seqs at its current position."""
        row_of, positions = self.row_of, self.positions
        for s in seqs:
            row = row_of.get(s.serial)
            if row is None or positions[row] != s.num_tokens - 1:
                return False
        return True


def finish_launch(seqs: list[Sequence], positions: list[int], logits: torch.Tensor) -> Launch:
    """Greedy picks of a launched step's logits, copied to the host without waiting (CUDA) → its Launch."""
    picks = logits.argmax(dim=-1)
    if picks.is_cuda:
        host = torch.empty(picks.shape, dtype=picks.dtype, pin_memory=True)
        host.copy_(picks, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return Launch(seqs, positions, picks, host, event)
    return Launch(seqs, positions, picks, picks, None)


def next_rows(cur: Launch, running: list[Sequence], ends_after_next: object) -> tuple[list[Sequence], list[int], list[int], list[int]]:
    """The rows of the step after `cur`: every running request except those `ends_after_next(seq)` says stop
    with cur's token. Returns (seqs, positions, host tokens, source rows): a request in cur continues from cur's
    device pick (source row ≥ 0, position one further); one that joined since (not in cur) starts from its
    last token on the host (source row −1)."""
    seqs: list[Sequence] = []
    positions: list[int] = []
    tokens: list[int] = []
    rows: list[int] = []
    row_of = cur.row_of
    for s in running:
        row = row_of.get(s.serial)
        if row is not None:
            if ends_after_next(s):  # type: ignore[operator]
                continue
            seqs.append(s)
            positions.append(cur.positions[row] + 1)
            tokens.append(0)
            rows.append(row)
        else:
            seqs.append(s)
            positions.append(s.num_tokens - 1)
            tokens.append(s.last_token)
            rows.append(-1)
    return seqs, positions, tokens, rows
