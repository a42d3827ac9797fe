"""Serve one unpacked bundle from MONAI Label's stock ``monaibundle`` app and call its REST infer endpoint.

    python ci/monailabel/serve_and_infer.py --python ~/.cache/brainsynth/monailabel-venv/bin/python \
        --bundle /tmp/workflow/brats_mri_med_ddpm --image /tmp/mask.nii.gz --out /tmp/result.nii.gz \
        [--params '{"output_modality": "t1ce"}']

What it does, with nothing but MONAI Label's own pieces:
  1. copies the ``monaibundle`` sample app that ships inside the MONAI Label package into a scratch folder, and
     the bundle into ``<app>/model/<name>`` (where the app looks for a local bundle);
  2. puts ``--image`` into a studies folder (MONAI Label's local datastore);
  3. starts ``monailabel start_server --app APP --studies STUDIES --conf models NAME --conf zoo_source github``
     on 127.0.0.1 (a free port), waits for ``GET /info/`` to list the model (bounded wait);
  4. ``POST /infer/NAME?image=ID&output=image`` with ``params`` and writes the returned volume to ``--out``;
  5. stops the server and prints the tail of its log.
Exit status 0 only when the server answered with a volume. Client side: the Python standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_app(python: str) -> Path:
    """The stock monaibundle app installed with MONAI Label (``<prefix>/monailabel/sample-apps/monaibundle``)."""
    prefix = subprocess.run(
        [python, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True, check=True
    ).stdout.strip()
    app = Path(prefix) / "monailabel" / "sample-apps" / "monaibundle"
    if not (app / "main.py").is_file():
        raise FileNotFoundError(f"{app}: MONAI Label's monaibundle sample app not found in {python}'s environment")
    return app


def _get(url: str, timeout: float = 10) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - 127.0.0.1 only
        return r.read()


def _post_form(url: str, fields: dict[str, str], timeout: float) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
            for k, v in fields.items()
        )
        + f"--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as r:  # noqa: S310 - 127.0.0.1 only
        return r.read(), r.headers.get("content-type", "")


def serve_and_infer(
    python: str,
    bundle: Path,
    image: Path,
    out: Path,
    params: dict | None = None,
    startup_timeout: float = 300,
    infer_timeout: float = 600,
    work: Path | None = None,
) -> dict:
    bundle, image, out = Path(bundle).resolve(), Path(image).resolve(), Path(out)
    name = bundle.name
    work = Path(work or tempfile.mkdtemp(prefix="monailabel_"))
    app = work / "app"
    shutil.copytree(sample_app(python), app, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(bundle, app / "model" / name, ignore=shutil.ignore_patterns("__pycache__"))
    studies = work / "studies"
    studies.mkdir()
    image_id = "input"
    suffix = "".join(image.suffixes) or ".nii.gz"
    shutil.copy2(image, studies / f"{image_id}{suffix}")
    port = free_port()
    monailabel = Path(python).parent / "monailabel"
    cmd = [
        str(monailabel),
        "start_server",
        "--app",
        str(app),
        "--studies",
        str(studies),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--conf",
        "models",
        name,
        "--conf",
        "zoo_source",
        "github",
        "--conf",
        "preload",
        "false",
        "--conf",
        "skip_trainers",
        "true",
        "--conf",
        "sam2",
        "false",
    ]
    log_path = work / "server.log"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false",
    }
    env.pop("PYTHONPATH", None)  # the server sees its own environment plus the bundle folder, nothing of ours
    env["MONAILABEL_PYEXE"] = python  # the launcher script runs `python -m monailabel.main` with this python
    env["PATH"] = os.pathsep.join([str(Path(python).parent), env.get("PATH", "")])
    base = f"http://127.0.0.1:{port}"
    result: dict = {"command": " ".join(cmd), "port": port, "work": str(work)}
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.time() + startup_timeout
            info = None
            while time.time() < deadline and server.poll() is None:
                try:
                    info = json.loads(_get(f"{base}/info/"))
                    break
                except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                    time.sleep(2)
            if info is None:
                raise RuntimeError(f"MONAI Label did not start within {startup_timeout:.0f} s (exit {server.poll()})")
            models = sorted(info.get("models", {}))
            result["models"] = models
            if name not in models:
                raise RuntimeError(f"MONAI Label lists models {models}, not {name}: the bundle was not accepted")
            started = time.time()
            body, content_type = _post_form(
                f"{base}/infer/{name}?image={image_id}&output=image",
                {"params": json.dumps(params or {})},
                infer_timeout,
            )
            result.update(infer_seconds=round(time.time() - started, 1), content_type=content_type, bytes=len(body))
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(body)
            result["out"] = str(out)
        except urllib.error.HTTPError as e:
            result["error"] = f"HTTP {e.code}: {e.read().decode(errors='replace')[-2000:]}"
        except Exception as e:
            result["error"] = f"{type(e).__name__}: {e}"
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
                try:
                    server.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(server.pid, signal.SIGKILL)
                    server.wait()
    result["log_tail"] = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", required=True, help="python of the MONAI Label virtual environment")
    parser.add_argument("--bundle", type=Path, required=True, help="unpacked bundle folder (with models/)")
    parser.add_argument("--image", type=Path, required=True, help="input volume for the bundle")
    parser.add_argument("--out", type=Path, required=True, help="where to write the returned volume")
    parser.add_argument("--params", default="{}", help="JSON params of the infer request")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args(argv)
    result = serve_and_infer(args.python, args.bundle, args.image, args.out, json.loads(args.params), work=args.work)
    print(json.dumps({k: v for k, v in result.items() if k != "log_tail"}, indent=1))
    print("--- server log (tail) ---\n" + result["log_tail"])
    return 0 if "out" in result and "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
