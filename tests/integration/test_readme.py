"""README's own commands, run as a user runs them: `make serve` (twice), its curls (image, text,
tabular), the client, the management CLI's list, `make stop`. Uses the ports of config.properties, so it is skipped if another program holds them."""
import json
import os
import re
import socket
import subprocess

import pytest

from models.catalog import ROOT
from scripts.serving.serve import project_server

pytestmark = pytest.mark.integration
README = os.path.join(ROOT, "README.md")


def readme_commands():
    text = open(README, encoding="utf-8").read()
    quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", quick_start, re.S)
    return [line.split("#")[0].strip() for block in blocks for line in block.splitlines() if line.strip()]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def run(command: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_readme_names_the_two_commands():
    commands = readme_commands()
    assert commands[:2] == ["make serve", "make test"]


def test_readme_quick_start_works():
    server = project_server()
    already_running = server.pid() is not None
    if not already_running and port_in_use(8080):
        pytest.skip("port 8080 is held by another program")
    commands = readme_commands()
    curl = next(c for c in commands if c.startswith("curl "))
    client = next(c for c in commands if "scripts.serving.client" in c)
    try:
        first = run("make serve")
        assert first.returncode == 0, first.stdout + first.stderr
        assert "TorchServe is ready" in first.stdout and curl in first.stdout
        pid = server.pid()
        again = run("make serve")
        assert again.returncode == 0 and "already running" in again.stdout
        assert server.pid() == pid  # no second server

        answer = run(curl, 120)
        assert answer.returncode == 0, answer.stderr
        top5 = json.loads(answer.stdout)
        assert len(top5) == 5 and {"label", "index", "probability"} == set(top5[0])
        from models.sample_data import PHOTO_CLASSES
        assert "china.jpg" in curl and top5[0]["label"] in PHOTO_CLASSES["china.jpg"], top5

        digit = run(client, 120)
        assert digit.returncode == 0, digit.stdout + digit.stderr
        assert json.loads(digit.stdout)["response"][0]["label"] == "7"

        text_curl = next(c for c in commands if c.startswith("curl ") and "/predictions/minilm" in c)
        embeddings = run(text_curl, 120)
        assert embeddings.returncode == 0, embeddings.stderr
        vectors = json.loads(embeddings.stdout)["embeddings"]
        assert len(vectors) == 2 and sum(a * b for a, b in zip(*vectors)) > 0.5  # a paraphrase pair

        tabular_curl = next(c for c in commands if c.startswith("curl ") and "/predictions/diabetes" in c)
        prediction = run(tabular_curl, 120)
        assert prediction.returncode == 0, prediction.stderr
        answer = json.loads(prediction.stdout)
        assert len(answer["predictions"]) == 1 and 25 <= answer["predictions"][0] <= 346

        listing = run(next(c for c in commands if "scripts.serving.manage list" in c), 120)
        assert listing.returncode == 0, listing.stdout + listing.stderr
        rows = [line.split() for line in listing.stdout.splitlines()]
        assert ["digits", "1.0", "*"] in [row[:3] for row in rows]  # the catalog's default, after start
        assert any(row[:2] == ["digits", "2.0"] and row[2] != "*" for row in rows)
    finally:
        if not already_running:
            stopped = run("make stop")
            assert stopped.returncode == 0
            assert project_server().pid() is None
