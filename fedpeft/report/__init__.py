"""``fedpeft report``: compare run folders in one self-contained HTML page with its figures."""

from fedpeft.report.page import WrittenReport, write_run_report
from fedpeft.report.runs import RunFolder, RunFolderError, load_runs

__all__ = ["RunFolder", "RunFolderError", "WrittenReport", "load_runs", "write_run_report"]
