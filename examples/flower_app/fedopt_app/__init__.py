"""fedopt served by Flower: the ServerApp drives a fedopt strategy, the ClientApp runs its tasks."""

from pathlib import Path

from fedopt.config import load_config

APP_DIR = Path(__file__).resolve().parent.parent


def app_path(value: str) -> Path:
    """A run-config path; relative ones are resolved against the app folder."""
    p = Path(value)
    return p if p.is_absolute() else APP_DIR / p


def run_config(context):
    """The fedopt config named by the Flower run config (``config = "..."``)."""
    return load_config(app_path(str(context.run_config["config"])))
