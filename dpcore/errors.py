"""Errors the engine raises on purpose: each names what is wrong and how to fix it."""


class DPCoreError(Exception):
    """Base class: any error a user can act on (the CLI prints these without a traceback)."""


class ConfigError(DPCoreError, ValueError):
    """A run-config field has an invalid value."""

    def __init__(self, field: str, problem: str, fix: str):
        self.field, self.problem, self.fix = field, problem, fix
        super().__init__(f"{field}: {problem}. Fix: {fix}")


class DataError(DPCoreError):
    """A data set cannot be found, read or split."""


class UnreadableImagesError(DataError):
    """One or more image files could not be decoded; all of them are listed."""

    def __init__(self, files: list[tuple[str, str]]):
        self.files = list(files)
        shown = "\n".join(f"  {path}: {why}" for path, why in self.files[:20])
        more = f"\n  ... and {len(self.files) - 20} more" if len(self.files) > 20 else ""
        super().__init__(
            f"{len(self.files)} image file(s) could not be read:\n{shown}{more}\n"
            "Fix: remove or replace these files, or pass --skip-unreadable to leave them out "
            "(the skipped files are then recorded with the run)."
        )


class OfflineError(DPCoreError):
    """Something had to be downloaded, and the download failed (no network)."""


class WeightsError(DPCoreError):
    """Pretrained weights could not be found or do not fit the backbone."""
