"""swf-engine: IHE Radiology Scheduled Workflow integration engine."""

__version__ = "0.1.0"
