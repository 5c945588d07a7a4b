"""A run folder's timeline: which checkpoints are this run's history, and what was abandoned.

A run is a line of steps. Resuming from an earlier checkpoint (step 2 of a run that reached step 6,
with another learning rate) starts a new line from that point: the old steps 4 and 6 are another
timeline, and nothing may treat them as this run's (``resume=latest``, pruning, the final save,
``evaluate``'s best checkpoint). Each line has an id; every checkpoint's ``state.json`` records the
id that wrote it; ``<run>/lineage.json`` holds the current id and its ancestors, each with the
step it was left at::

    {"id": "5f0c9e2a", "ancestors": [{"id": "a41d07b3", "until": 2}]}

A checkpoint belongs to the run if its id is the current one, or an ancestor's at a step up to
where the run left it (or it has no id: written before lineages were recorded). What belonged to
an abandoned line is moved to ``<run>/abandoned/<name>/`` by :mod:`dreambooth_kit.training.runfolder`,
never deleted.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path

LINEAGE = "lineage.json"


@dataclass(frozen=True)
class Lineage:
    id: str
    ancestors: tuple[tuple[str, int], ...] = field(default=())  # (id, last step kept), oldest first

    @staticmethod
    def new_id() -> str:
        return secrets.token_hex(4)

    def owns(self, lineage_id: str | None, step: int) -> bool:
        """Whether a checkpoint written by ``lineage_id`` at ``step`` is part of this timeline."""
        if lineage_id is None or lineage_id == self.id:
            return True
        return any(lineage_id == a and step <= until for a, until in self.ancestors)

    def branch(self, from_id: str | None, step: int) -> Lineage:
        """A new line that continues the checkpoint of ``from_id`` at ``step``: its history is
        ``from_id``'s own (a checkpoint without an id is taken as this line's) up to that step."""
        from_id = from_id or self.id
        ids = [a for a, _ in self.ancestors]
        if from_id == self.id:
            history = self.ancestors
        else:  # an ancestor's line keeps what came before it; a foreign line has no history here
            history = self.ancestors[: ids.index(from_id)] if from_id in ids else ()
        return Lineage(Lineage.new_id(), history + ((from_id, step),))

    def to_dict(self) -> dict:
        return {"id": self.id, "ancestors": [{"id": a, "until": u} for a, u in self.ancestors]}


def read_lineage(run_dir: str | Path) -> Lineage | None:
    """The run folder's lineage, or None (a folder from before lineages, or none written yet).
    A damaged file counts as none: every checkpoint then counts as the run's, as before."""
    try:
        data = json.loads((Path(run_dir) / LINEAGE).read_text(encoding="utf-8"))
        ancestors = tuple((str(a["id"]), int(a["until"])) for a in data.get("ancestors", []))
        return Lineage(str(data["id"]), ancestors)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def write_lineage(run_dir: str | Path, lineage: Lineage) -> Path:
    from dreambooth_kit.util.atomic import write_json

    return write_json(Path(run_dir) / LINEAGE, lineage.to_dict(), indent=2)
