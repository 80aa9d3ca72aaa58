"""azd's environment file: parsing what azd writes, finding it, and the client's precedence
(flag > BATCHCTL_* variable > .azure/<env>/.env), with files these tests write."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from batchctl import azdenv, cli, client
from batchctl.client import AppClient, AppError, client_storage_settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "BATCHCTL_APP_URL",
        "BATCHCTL_BLOB_URL",
        "AZURE_ENV_NAME",
        "BATCHCTL_FUNCTION_KEY",
    ):
        monkeypatch.delenv(name, raising=False)
    for name in ("BATCHCTL_STORAGE_AUTH", "BATCHCTL_QUEUE_URL", "BATCHCTL_TABLE_URL"):
        monkeypatch.delenv(name, raising=False)


def make_project(
    root: Path, env: str = "dev", lines: str = "", *, default: str | None = "dev"
) -> Path:
    """A folder as `azd up` leaves it: azure.yaml, .azure/config.json, .azure/<env>/.env."""
    (root / "azure.yaml").write_text("name: batchctl\n")
    (root / ".azure" / env).mkdir(parents=True, exist_ok=True)
    if default is not None:
        (root / ".azure" / "config.json").write_text(
            json.dumps({"version": 1, "defaultEnvironment": default})
        )
    (root / ".azure" / env / ".env").write_text(lines)
    return root


# -- the format ------------------------------------------------------------------------------
def test_parses_what_godotenv_marshal_writes() -> None:
    # godotenv.Marshal: sorted KEY="value" lines, integers bare, special characters escaped.
    text = (
        'AZURE_ENV_NAME="dev"\n'
        'AZURE_FUNCTION_APP_URL="https://func-abc.azurewebsites.net"\n'
        "AZURE_PORT=8080\n"
        'QUOTED="say \\"hi\\" \\$HOME \\`x\\` \\! back\\\\slash"\n'
        'TWO_LINES="first\\nsecond"\n'
        'EMPTY=""\n'
    )
    values = azdenv.parse_dotenv(text)
    assert values == {
        "AZURE_ENV_NAME": "dev",
        "AZURE_FUNCTION_APP_URL": "https://func-abc.azurewebsites.net",
        "AZURE_PORT": "8080",
        "QUOTED": 'say "hi" $HOME `x` ! back\\slash',
        "TWO_LINES": "first\nsecond",
        "EMPTY": "",
    }


def test_parses_hand_edited_lines() -> None:
    text = (
        "# a comment\n"
        "\n"
        "export EXPORTED=yes\n"
        "BARE=value # trailing comment\n"
        "SINGLE='literal \\n $x'\n"
        'MULTI="line one\n'
        'line two"\n'
        "not an assignment\n"
        "DUP=first\n"
        "DUP=second\n"
    )
    assert azdenv.parse_dotenv(text) == {
        "EXPORTED": "yes",
        "BARE": "value",
        "SINGLE": "literal \\n $x",
        "MULTI": "line one\nline two",
        "DUP": "second",
    }


# -- finding the file ------------------------------------------------------------------------
def test_finds_the_default_environment_from_a_subfolder(tmp_path: Path) -> None:
    make_project(tmp_path, lines='AZURE_FUNCTION_APP_URL="https://func-a.azurewebsites.net"\n')
    below = tmp_path / "videos" / "batch1"
    below.mkdir(parents=True)
    found = azdenv.load_azd_environment(below, environ={})
    assert found is not None
    assert found.name == "dev"
    assert found.path == (tmp_path / ".azure" / "dev" / ".env").resolve()
    assert found.get("BATCHCTL_APP_URL", "AZURE_FUNCTION_APP_URL") == (
        "https://func-a.azurewebsites.net"
    )


def test_azure_env_name_selects_another_environment(tmp_path: Path) -> None:
    make_project(tmp_path, "dev", 'BATCHCTL_APP_URL="https://func-dev.azurewebsites.net"\n')
    make_project(tmp_path, "prod", 'BATCHCTL_APP_URL="https://func-prod.azurewebsites.net"\n')
    found = azdenv.load_azd_environment(tmp_path, environ={"AZURE_ENV_NAME": "prod"})
    assert found is not None and found.values["BATCHCTL_APP_URL"].endswith(
        "func-prod.azurewebsites.net"
    )


@pytest.mark.parametrize(
    ("setup", "environ"),
    [
        ("no project", {}),
        ("no default", {}),
        ("missing env folder", {"AZURE_ENV_NAME": "gone"}),
        ("escaping name", {"AZURE_ENV_NAME": "../../etc"}),
        ("broken config", {}),
    ],
)
def test_no_environment_is_none_never_an_error(
    tmp_path: Path, setup: str, environ: dict[str, str]
) -> None:
    if setup != "no project":
        make_project(tmp_path, lines="X=1\n", default=None if setup == "no default" else "dev")
    if setup == "broken config":
        (tmp_path / ".azure" / "config.json").write_text("{not json")
    assert azdenv.load_azd_environment(tmp_path, environ=environ) is None


# -- precedence ------------------------------------------------------------------------------
AZD_LINES = (
    'AZURE_FUNCTION_APP_URL="https://func-old.azurewebsites.net"\n'
    'BATCHCTL_APP_URL="https://func-azd.azurewebsites.net"\n'
    'AZURE_STORAGE_BLOB_ENDPOINT="https://stazd.blob.core.windows.net/"\n'
)


@pytest.fixture
def in_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    make_project(tmp_path, lines=AZD_LINES)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_flag_beats_variable_beats_azd_file(in_project: Path, monkeypatch) -> None:
    monkeypatch.setenv("BATCHCTL_APP_URL", "https://func-env.azurewebsites.net")
    explicit = client.resolve_app_url("https://func-flag.azurewebsites.net")
    assert (explicit.value, explicit.source) == ("https://func-flag.azurewebsites.net", "--app")
    from_env = client.resolve_app_url(None)
    assert (from_env.value, from_env.source) == (
        "https://func-env.azurewebsites.net",
        "$BATCHCTL_APP_URL",
    )
    monkeypatch.delenv("BATCHCTL_APP_URL")
    from_azd = client.resolve_app_url(None)
    # BATCHCTL_APP_URL (the newer output) wins over AZURE_FUNCTION_APP_URL in the same file.
    assert from_azd.value == "https://func-azd.azurewebsites.net"
    assert from_azd.source is not None and from_azd.source.startswith("BATCHCTL_APP_URL in ")
    assert str(in_project / ".azure" / "dev" / ".env") in from_azd.source


def test_older_environment_falls_back_to_azure_function_app_url(tmp_path, monkeypatch) -> None:
    make_project(tmp_path, lines='AZURE_FUNCTION_APP_URL="https://func-old.azurewebsites.net"\n')
    monkeypatch.chdir(tmp_path)
    assert AppClient.from_environment().app_url == "https://func-old.azurewebsites.net"


def test_app_client_and_storage_read_the_azd_file(in_project: Path, monkeypatch) -> None:
    monkeypatch.setenv("BATCHCTL_FUNCTION_KEY", "k")
    assert AppClient.from_environment().app_url == "https://func-azd.azurewebsites.net"
    assert AppClient.from_environment("https://x.azurewebsites.net").app_url == (
        "https://x.azurewebsites.net"
    )
    settings = client_storage_settings()
    assert settings.blob_url == "https://stazd.blob.core.windows.net"  # settings trim the slash
    monkeypatch.setenv("BATCHCTL_BLOB_URL", "https://stenv.blob.core.windows.net")
    assert client_storage_settings().blob_url == "https://stenv.blob.core.windows.net"
    assert client_storage_settings("https://stflag.blob.core.windows.net").blob_url == (
        "https://stflag.blob.core.windows.net"
    )


def test_without_any_source_the_error_names_all_three(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no azure.yaml here or above (tmp is outside the repo)
    with pytest.raises(AppError, match=r"--app.*BATCHCTL_APP_URL.*azd up"):
        AppClient.from_environment()
    with pytest.raises(AppError, match=r"--blob-url.*BATCHCTL_BLOB_URL.*azd up"):
        client_storage_settings()


def test_status_command_uses_the_azd_app(in_project: Path, monkeypatch, capsys) -> None:
    # The command reaches the app named in the file: here nothing listens, so it says where.
    path = in_project / ".azure" / "dev" / ".env"
    path.write_text('BATCHCTL_APP_URL="http://127.0.0.1:9"\n')
    monkeypatch.setattr(client, "DEFAULT_BACKOFF_S", 0.001)
    code = cli.main(["status", "run-x"])
    assert code == 3
    assert "127.0.0.1:9" in capsys.readouterr().err


# -- azd up's closing lines --------------------------------------------------------------------
def _postup_script() -> str:
    text = (ROOT / "azure.yaml").read_text()
    block = re.search(r"^  postup:\n((?:    .*\n|\n)+)", text, re.MULTILINE)
    assert block, "azure.yaml has no postup hook"
    body = block.group(1)
    assert re.search(r"^    shell: sh$", body, re.MULTILINE)
    script = re.search(r"^    run: \|\n((?:      .*\n|\n)+)", body, re.MULTILINE)
    assert script, "postup runs an inline script"
    return "\n".join(line[6:] for line in script.group(1).splitlines()) + "\n"


def test_azd_up_ends_with_the_next_steps() -> None:
    # What azd hands a hook: the environment's values as variables (here made up).
    environ = {
        "PATH": os.environ["PATH"],
        "AZURE_ENV_NAME": "dev",
        "AZURE_RESOURCE_GROUP": "rg-dev",
        "AZURE_FUNCTION_APP_NAME": "func-abc",
        "AZURE_FUNCTION_APP_URL": "https://func-abc.azurewebsites.net",
        "AZURE_STORAGE_BLOB_ENDPOINT": "https://stabc.blob.core.windows.net/",
        "BATCHCTL_APP_URL": "https://func-abc.azurewebsites.net",
        "BATCHCTL_BLOB_URL": "https://stabc.blob.core.windows.net/",
    }
    done = subprocess.run(
        ["sh", "-c", _postup_script()],
        env=environ,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    # The key command, never a key: the hook does not call az.
    assert (
        'export BATCHCTL_FUNCTION_KEY="$(az functionapp keys list --resource-group rg-dev '
        '--name func-abc --query functionKeys.default --output tsv)"' in out
    )
    assert "export BATCHCTL_APP_URL=https://func-abc.azurewebsites.net" in out
    assert "export BATCHCTL_BLOB_URL=https://stabc.blob.core.windows.net/" in out
    assert ".azure/dev/.env" in out
    assert "batchctl doctor --app https://func-abc.azurewebsites.net" in out
