"""From capture files to graded flows: the streaming loop that ties the modules together."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from tapproof.audit.capture import decode, file_size, read_packets
from tapproof.audit.errors import CaptureCorrupt
from tapproof.audit.flows import DEFAULT_LIMIT, Flow, FlowTable

__all__ = ["AuditResult", "Progress", "analyze"]

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass(slots=True)
class AuditResult:
    """Everything the reports need: flows plus what went wrong on the way."""

    flows: list[Flow]
    files: list[str]
    packets: int = 0
    tcp_packets: int = 0
    warnings: list[str] = field(default_factory=list)
    corrupt: bool = False


def analyze(
    paths: Iterable[str],
    *,
    progress: Progress | None = None,
    limit: int = DEFAULT_LIMIT,
) -> AuditResult:
    """Analyse capture files (one flow table across them, in order).

    Raises :class:`~tapproof.audit.errors.AuditInputError` for a file that is
    not a usable capture at all; a file that breaks part-way adds a warning
    and the packets before the break are still reported.
    """
    paths = list(paths)
    table = FlowTable(limit=limit)
    result = AuditResult(flows=[], files=paths)
    sizes = [file_size(p) for p in paths]
    total = sum(sizes)
    done_before = 0
    add = table.add
    for path, size in zip(paths, sizes, strict=True):
        packets = tcp = 0
        approx = 0
        try:
            for ts, linktype, frame in read_packets(path):
                packets += 1
                approx += len(frame) + 16
                seg = decode(linktype, frame)
                if seg is not None:
                    tcp += 1
                    add(ts, seg)
                if progress is not None and not packets & 0x3FFF:
                    progress(done_before + approx, total)
        except CaptureCorrupt as exc:
            result.corrupt = True
            result.warnings.append(str(exc))
        result.packets += packets
        result.tcp_packets += tcp
        done_before += size
        if progress is not None:
            progress(done_before, total)
    table.flush()
    result.flows = list(table.flows())
    result.flows.sort(key=lambda f: f.first_seen)
    return result
