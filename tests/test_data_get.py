"""Issue 28: `gpctl data get cifar5m` against a loopback HTTP server the test starts (127.0.0.1 only):
small parts in the real format (npz of X uint8 N×32×32×3, Y labels), a connection cut mid-part and
its resume by an HTTP range request, a resume of a file an earlier run left, a 404, a corrupt part,
and the memory-mapped .npy form the loader reads with the same bits as the .npz."""
import http.server
import io
import socket
import threading

import numpy as np
import pytest
from typer.testing import CliRunner

from engine.data.fetch import FetchError, check_cifar5m_part, download, get_cifar5m
from gpctl.cli import app


def part_bytes(k: int, n: int = 40) -> bytes:
    rng = np.random.default_rng(k)
    buf = io.BytesIO()
    np.savez(buf, X=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), Y=rng.integers(0, 10, n).astype(np.int64))
    return buf.getvalue()


class Server:
    """Serves `files` by name; `cut` names are cut once after half their bytes; `no_ranges` ignores
    Range headers; every request's (path, Range) is logged."""

    def __init__(self, files: dict[str, bytes], cut=(), no_ranges=False):
        self.files, self.cut, self.no_ranges, self.log = dict(files), set(cut), no_ranges, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                rng = self.headers.get("Range")
                outer.log.append((name, rng))
                if name not in outer.files:
                    self.send_error(404, "Not Found")
                    return
                body = outer.files[name]
                start = int(rng.split("=")[1].split("-")[0]) if rng and not outer.no_ranges else 0
                if start >= len(body) and rng:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if name in outer.cut:
                    outer.cut.discard(name)
                    self.wfile.write(body[start:start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/part{{k}}.npz"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


PARTS = {f"part{k}.npz": part_bytes(k) for k in range(6)}


def test_downloads_all_six_parts_checks_them_and_resumes_a_cut_part(tmp_path):
    with Server(PARTS, cut={"part2.npz"}) as srv:
        seen = []
        done = get_cifar5m(tmp_path, srv.url, progress=lambda name, have, total: seen.append((name, have, total)),
                           backoff=0.01)
    assert done == {f"part{k}.npz": 40 for k in range(6)}
    for name, body in PARTS.items():
        assert (tmp_path / name).read_bytes() == body
        assert not (tmp_path / (name + ".part")).exists()
    # part2 was cut after half its bytes, then asked for the rest with a range request
    asks = [r for n, r in srv.log if n == "part2.npz"]
    half = len(PARTS["part2.npz"]) // 2
    assert asks == [None, f"bytes={half}-"]
    assert [r for n, r in srv.log if n != "part2.npz"] == [None] * 5
    assert seen[-1] == ("part5.npz", len(PARTS["part5.npz"]), len(PARTS["part5.npz"]))
    assert len(srv.log) == 7                          # six parts and one resume
    # run again: every part is already there and sound, nothing is fetched
    with Server(PARTS) as srv2:
        assert get_cifar5m(tmp_path, srv2.url) == done and srv2.log == []


def test_a_partial_file_from_an_earlier_run_is_continued_and_a_server_without_ranges_restarts_it(tmp_path):
    body = PARTS["part0.npz"]
    (tmp_path / "part0.npz.part").write_bytes(body[:1000])
    with Server(PARTS) as srv:
        assert download(srv.url.format(k=0), tmp_path / "part0.npz") == len(body)
    assert srv.log == [("part0.npz", "bytes=1000-")] and (tmp_path / "part0.npz").read_bytes() == body
    (tmp_path / "part1.npz.part").write_bytes(b"x" * 1000)          # garbage: the server sends it all again
    with Server(PARTS, no_ranges=True) as srv:
        download(srv.url.format(k=1), tmp_path / "part1.npz")
    assert (tmp_path / "part1.npz").read_bytes() == PARTS["part1.npz"]


def test_a_404_is_one_line_naming_the_url_and_the_parts_before_it_are_kept(tmp_path):
    files = {k: v for k, v in PARTS.items() if k != "part3.npz"}
    with Server(files) as srv:
        res = CliRunner().invoke(app, ["data", "get", "cifar5m", "--out", str(tmp_path), "--url", srv.url])
    assert res.exit_code == 2
    assert res.stderr.strip() == f"error: {srv.url.format(k=3)}: HTTP 404 Not Found"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part0.npz", "part1.npz", "part2.npz"]


def test_a_connection_that_keeps_failing_gives_up_and_keeps_what_it_has(tmp_path):
    with Server(PARTS, cut={"part0.npz"}) as srv:
        srv.cut = type("Always", (set,), {"discard": lambda self, x: None})({"part0.npz"})   # cut every time
        with pytest.raises(FetchError) as e:
            download(srv.url.format(k=0), tmp_path / "part0.npz", retries=2, backoff=0.01)
    msg, size = str(e.value), len(PARTS["part0.npz"])
    kept = (tmp_path / "part0.npz.part").stat().st_size    # each try brought half of what was left, the last none
    assert kept == size - 1 and (tmp_path / "part0.npz.part").read_bytes() == PARTS["part0.npz"][:kept]
    assert msg == (f"{srv.url.format(k=0)}: the connection closed at byte {kept} of {size}; 2 retries in a row "
                   f"without progress; {kept} of {size} bytes kept in {tmp_path / 'part0.npz.part'}: run the command "
                   "again to resume")


def test_a_corrupt_part_is_refused_by_name_and_moved_aside(tmp_path):
    bad = bytearray(PARTS["part4.npz"])
    bad[600:700] = b"\0" * 100                       # inside X's bytes: the zip's CRC no longer holds
    files = dict(PARTS, **{"part4.npz": bytes(bad)})
    with Server(files) as srv:
        with pytest.raises(FetchError) as e:
            get_cifar5m(tmp_path, srv.url)
    assert str(e.value) == (f"{tmp_path / 'part4.npz'}: not a CIFAR-5m part: member X.npy fails its CRC "
                            "(moved to part4.npz.corrupt)")
    assert (tmp_path / "part4.npz.corrupt").read_bytes() == bytes(bad)
    assert (tmp_path / "part5.npz").exists()           # the others are still fetched and kept
    # wrong arrays in a sound zip: named too (negative control: a sound part passes)
    buf = io.BytesIO()
    np.savez(buf, X=np.zeros((4, 32, 32), np.uint8), Y=np.zeros(4, np.int64))
    (tmp_path / "odd.npz").write_bytes(buf.getvalue())
    with pytest.raises(FetchError, match=r"odd.npz: X must be uint8 N×32×32×3, got uint8 \(4, 32, 32\)"):
        check_cifar5m_part(tmp_path / "odd.npz")
    np.savez(tmp_path / "labels.npz", X=np.zeros((4, 32, 32, 3), np.uint8), Y=np.array([0, 1, 2, 10]))
    with pytest.raises(FetchError, match="labels must be 0..9, found 0..10"):
        check_cifar5m_part(tmp_path / "labels.npz")
    assert check_cifar5m_part(tmp_path / "part5.npz") == 40


def test_npy_parts_are_memory_mapped_by_the_loader_with_the_same_bits(tmp_path):
    import torch

    from engine.config import DataConfig
    from engine.data.images import cifar5m
    a, b = tmp_path / "npz", tmp_path / "npy"
    with Server(PARTS) as srv:
        get_cifar5m(a, srv.url, parts=[0, 1])
        res = CliRunner().invoke(app, ["data", "get", "cifar5m", "--out", str(b), "--url", srv.url,
                                       "--parts", "0,1", "--npy"])
    assert res.exit_code == 0, res.output
    assert "part0.X.npy, part0.Y.npy: written" in res.stdout and res.stdout.strip().endswith(
        f'--set data.path="{b}"')
    for p in ("part0.npz", "part1.npz"):
        (b / p).unlink()                                # only the .npy form is left: the loader reads it
    assert sorted(p.name for p in b.iterdir()) == ["part0.X.npy", "part0.Y.npy", "part1.X.npy", "part1.Y.npy"]
    dc = lambda path: DataConfig(source="cifar5m", path=str(path), eval_samples=10, hold="device")   # noqa: E731
    x, y = cifar5m(dc(a), torch.device("cpu")), cifar5m(dc(b), torch.device("cpu"))
    assert torch.equal(x.x, y.x) and torch.equal(x.y, y.y) and len(x.x) == 70
    assert torch.equal(x.eval_set.x, y.eval_set.x)
    # negative control: another part's bits differ
    c = tmp_path / "other"
    with Server(PARTS) as srv:
        get_cifar5m(c, srv.url, parts=[2, 1])
    assert not torch.equal(cifar5m(dc(c), torch.device("cpu")).x, x.x)


def test_bad_arguments_are_one_line(tmp_path):
    r = CliRunner()
    res = r.invoke(app, ["data", "get", "imagenet", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "unknown data set 'imagenet' (known: cifar5m)" in res.output
    res = r.invoke(app, ["data", "get", "cifar5m", "--out", str(tmp_path), "--parts", "7"])
    assert res.exit_code == 2 and "parts are 0..5, got '7'" in res.output
    res = r.invoke(app, ["data", "get", "cifar5m", "--out", str(tmp_path), "--url", "http://127.0.0.1:9/x.npz"])
    assert res.exit_code == 2 and "must contain {k}" in res.stderr


def test_data_check_says_what_a_preset_needs_and_what_each_arm_draws(tmp_path):
    """`gpctl data check PRESET`: the data set, there or not (with how to get it), and each arm's draws
    against its size; exit 1 when missing. `presets check` says the same as a warning and passes."""
    import json as _json
    r = CliRunner()
    missing = tmp_path / "none"
    res = r.invoke(app, ["data", "check", "cifar_bs32_512_tiny"])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[0] == "synthetic_images: generated as it trains, nothing to download"
    # a real preset whose data is absent: the one line `gpctl run` would stop with
    res = r.invoke(app, ["data", "check", "cifar_bs32_512", "--json"], env={"HOME": str(missing)})
    assert res.exit_code == 1
    rows = _json.loads(res.stdout)
    want = (f"CIFAR-5m not found: no part0.npz … part5.npz in {missing}/data/cifar5m (set data.path=DIR, or "
            f"download it: gpctl data get cifar5m --out {missing}/data/cifar5m, ~18 GB)")
    assert [r["arm"] for r in rows] == ["bs32to512", "bs32", "bs512", "bs512_seed2"]
    assert all(r["missing"] == want and r["bytes"] is None for r in rows)
    by = {r["arm"]: r for r in rows}
    # the draws are the plan's: steps × batch (bs512: 11700 × 512), against the published size less the eval set
    assert by["bs512"]["draws"] == 11700 * 512 and by["bs512"]["of"] == 6_002_688 - 10_000
    assert abs(by["bs512"]["epochs"] - 11700 * 512 / (6_002_688 - 10_000)) < 1e-12
    res = r.invoke(app, ["presets", "check", "cifar_bs32_512"], env={"HOME": str(missing)})
    assert res.exit_code == 0 and f"  DATA cifar_bs32_512: {want} (a warning" in res.stdout
    # a folder: each part checked (negative control: a cut part fails, by name)
    folder = tmp_path / "c5"
    folder.mkdir()
    for k in (0, 1):
        (folder / f"part{k}.npz").write_bytes(PARTS[f"part{k}.npz"])
    res = r.invoke(app, ["data", "check", str(folder)])
    assert res.exit_code == 0 and res.stdout.splitlines() == [f"{folder / 'part0.npz'}: 40 images",
                                                             f"{folder / 'part1.npz'}: 40 images"]
    (folder / "part1.npz").write_bytes(PARTS["part1.npz"][:500])
    res = r.invoke(app, ["data", "check", str(folder)])
    assert res.exit_code == 1 and res.stdout.splitlines()[1].startswith(f"{folder / 'part1.npz'}: not a CIFAR-5m part")
