"""Credentials in a tracking URI are never printed: raycache masks them in what it says and keeps them off
command lines (which every user of a machine can read)."""

import os

import pytest

from raycache.tracking import masked

SECRET_URI = "postgresql://alice:s3cret@db.example:5432/mlflow?sslmode=require&password=hunter2&token=abc"


@pytest.mark.parametrize("uri, shown", [
    (SECRET_URI, "postgresql://alice:***@db.example:5432/mlflow?sslmode=require&password=***&token=***"),
    ("https://user:pw@mlflow.example/?X-Amz-Signature=zz&x=1", "https://user:***@mlflow.example/?X-Amz-Signature=***&x=1"),
    ("https://token@mlflow.example/", "https://token@mlflow.example/"),  # a user name alone is not secret
    # SQLAlchemy takes '/', '?', '#' and '@' unencoded in a password: all of it is hidden
    ("postgresql://bob:pa/ss@db/mlflow", "postgresql://bob:***@db/mlflow"),
    ("mysql://bob:p?w@db/x", "mysql://bob:***@db/x"),
    ("mysql://bob:p@ss#w@db:3306/x?password=q", "mysql://bob:***@db:3306/x?password=***"),
    ("sqlite:////home/me/mlflow.db", "sqlite:////home/me/mlflow.db"),
    ("databricks", "databricks"),
])
def test_masked(uri, shown):
    assert masked(uri) == shown


def test_the_ui_hint_and_the_ui_command_never_carry_a_password(monkeypatch, capsys):
    from raycache import cli
    from raycache.tracking import Run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", SECRET_URI)
    run = Run.__new__(Run)  # a run's printing, without a server to open it on
    run.uri, run.experiment_id, run.run_id = SECRET_URI, "1", "abc"
    assert "s3cret" not in run.ui_hint() and "hunter2" not in run.ui_hint()
    assert run.ui_hint().startswith("raycache ui ")  # which keeps the store off the command line
    started = {}
    monkeypatch.setattr(os, "execvpe", lambda file, argv, env: started.update(argv=argv, env=env))
    assert cli.main(["ui"]) == 0
    assert not any("s3cret" in a or "hunter2" in a for a in started["argv"])  # not on the command line
    assert started["env"]["MLFLOW_BACKEND_STORE_URI"] == SECRET_URI  # the UI still opens the right store
    err = capsys.readouterr().err
    assert "s3cret" not in err and "alice:***@db.example" in err
