"""Errors for bad user input. Every message names where the input came from and what was expected."""
from __future__ import annotations


class InputError(ValueError):
    """A user-supplied input (file, record, waveform, image) is unusable.

    `source` is the file path or a description of the in-memory object; `record` the manifest record id and
    `manifest` the manifest path when known. `str(err)` always contains all known locations.
    """

    def __init__(self, message: str, *, source: str | None = None, record: str | None = None,
                 manifest: str | None = None, item: int | None = None):
        self.reason = message
        self.source = source
        self.record = record
        self.manifest = manifest
        self.item = item
        super().__init__(self._format())

    def _format(self) -> str:
        where = []
        if self.manifest is not None:
            where.append(f"manifest {self.manifest}")
        if self.record is not None:
            where.append(f"record {self.record!r}")
        if self.item is not None:
            where.append(f"batch item {self.item}")
        if self.source is not None:
            where.append(f"file {self.source}")
        return (", ".join(where) + ": " if where else "") + self.reason

    def located(self, *, record: str | None = None, manifest: str | None = None,
                item: int | None = None) -> "InputError":
        """The same error with more location filled in (existing fields win)."""
        return InputError(self.reason, source=self.source, record=self.record or record,
                          manifest=self.manifest or manifest, item=self.item if self.item is not None else item)
