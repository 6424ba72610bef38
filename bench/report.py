"""The HTML report of a large batch job: generation time, size on disk, and open time in headless
Chromium, for a synthetic job of N images beside one of N/10 (side by side, in one run).

Each job is written by :func:`camserve.testing.jobs.write_job` (96x72 PNG inputs, heatmap and
overlay artefacts, two metrics per image, 1 % errors). Then, per job:

* generation: the first ``camserve-report`` run (every thumbnail made) and a second run (nothing
  to make: the incremental case), wall time;
* size: report.html + report_files/ (the viewer and the data chunks) and thumbs/, in bytes on disk
  (allocated blocks), and the thumbnails' own sizes;
* open: ``--opens`` fresh page loads from a file:// URL in one headless Chromium; the time from
  navigation start to the first gallery render (``camserveReport.timing.render``) and to every
  thumbnail of the first page loaded; medians;
* interaction: the median time of a text filter and of a metric sort over every row (each with
  the first page rendered again), and of a detail open (its chunk loaded, its images decoded),
  measured in the page.

Usage::

    python -m bench.report [--n 10000] [--opens 5] [--workers N] [--repeat K] [--keep DIR]

``--repeat 10`` makes the page of a 100,000-row job from 10,000 images (the lines repeat, so the
thumbnails are shared and made once).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from camserve.report import write_report
from camserve.testing.browser import MISSING, Chromium, find_chromium
from camserve.testing.jobs import write_job

#: every thumbnail in the window has loaded (the rest of the page loads lazily, as it scrolls)
THUMBS_LOADED = ("(() => { const i = Array.from(document.querySelectorAll('#gallery img'))"
                 ".filter((x) => x.getBoundingClientRect().top < innerHeight);"
                 " return i.length > 0 && i.every((x) => x.complete && x.naturalWidth > 0); })()")


def _disk(path: Path) -> int:
    """Bytes on disk (allocated blocks) of a file or a tree."""
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum((Path(d) / f).stat().st_blocks * 512 for d, _, files in os.walk(path) for f in files)


def _apparent(path: Path) -> int:
    """Bytes of the files of a tree (their sizes, not their blocks)."""
    return sum((Path(d) / f).stat().st_size for d, _, files in os.walk(path) for f in files)


def _files(path: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(path))


def _in_page(b: Chromium, action: str, done: str) -> float:
    """Milliseconds from running ``action`` to ``done`` becoming true, timed in the page."""
    b.evaluate("window.__t0 = performance.now(); " + action)
    b.wait_for(done, timeout=60, interval=0.005)
    return b.evaluate("performance.now() - window.__t0")


def _sync(b: Chromium, action: str) -> float:
    """Milliseconds of a synchronous ``action`` (an event whose handler filters, sorts and
    renders the first page), timed in the page."""
    return b.evaluate(f"(() => {{ const t0 = performance.now(); {action}"
                      f" return performance.now() - t0; }})()")


def measure(root: Path, n: int, opens: int, workers: int | None,
            repeat: int = 1) -> dict[str, Any]:
    out, inputs = root / f"job{n}", root / f"in{n}"
    t = time.perf_counter()
    write_job(out, n, inputs=inputs, root=root, size=(96, 72), errors=max(1, n // 100), seed=n)
    if repeat > 1:  # the same lines again: more rows, the same images and thumbnails
        lines = (out / "results.jsonl").read_bytes()
        (out / "results.jsonl").write_bytes(lines * repeat)
    made = time.perf_counter() - t
    t = time.perf_counter()
    first = write_report(out, input_root=root, workers=workers)
    gen1 = time.perf_counter() - t
    t = time.perf_counter()
    second = write_report(out, input_root=root, workers=workers)
    gen2 = time.perf_counter() - t
    assert second.thumbs_made == 0 and first.preview_failures == 0
    index = sum(p.stat().st_size for p in (out / "report_files").glob("data-*/index-*.js"))
    r: dict[str, Any] = {
        "n": n * repeat, "job_s": made, "gen_s": gen1, "regen_s": gen2, "thumbs": first.thumbs_made,
        "page_bytes": _disk(out / "report.html") + _disk(out / "report_files"),
        "data_files": _files(out / "report_files"), "thumb_bytes": _disk(out / "thumbs"),
        "thumb_size": _apparent(out / "thumbs"), "index_bytes": index,
        "chunks": (first.index_chunks, first.detail_chunks)}
    render, thumbs, walls = [], [], []
    filt, sort, detail = [], [], []
    url = (out / "report.html").as_uri()
    with Chromium(size=(1400, 1000), timeout=120) as b:
        for _ in range(opens):
            b.navigate("about:blank")
            t = time.perf_counter()
            b.navigate(url, timeout=120)
            b.wait_for("document.documentElement.dataset.state === 'ready'", timeout=120)
            walls.append(1000 * (time.perf_counter() - t))
            render.append(b.evaluate("window.camserveReport.timing.render"))
            b.wait_for(THUMBS_LOADED, timeout=120)
            thumbs.append(b.evaluate("performance.now()"))
            cards = "document.querySelectorAll('#gallery .card').length"
            b.evaluate("document.getElementById('f-text').value = 'img_0000';")
            filt.append(_sync(b, "document.getElementById('f-label').dispatchEvent("
                                 "new Event('change'));"))
            assert b.evaluate(cards) == min(100, 10 * repeat)      # img_00000..img_00009
            b.evaluate("document.getElementById('f-text').value = '';")
            sort.append(_sync(b, "const s = document.getElementById('f-sort'); s.value = 'x0';"
                                 " s.dispatchEvent(new Event('change'));"))
            assert b.evaluate(cards) == min(100, n * repeat)       # every row: the first page
            detail.append(_in_page(
                b, "document.querySelectorAll('#gallery .card')[57].click();",
                "(() => { const i = Array.from(document.querySelectorAll('#d-body figure img'));"
                " return i.length === 3 && i.every((x) => x.complete && x.naturalWidth > 0); })()"))
            b.evaluate("document.getElementById('d-close').click()")
        problems = b.problems()
    r.update(open_ms=statistics.median(render), open_wall_ms=statistics.median(walls),
             thumbs_ms=statistics.median(thumbs), filter_ms=statistics.median(filt),
             sort_ms=statistics.median(sort), detail_ms=statistics.median(detail),
             problems=problems)
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10_000, help="images of the large job (default 10000)")
    p.add_argument("--opens", type=int, default=5, help="page loads per job (default 5)")
    p.add_argument("--workers", type=int, help="thumbnail threads (default: the report's)")
    p.add_argument("--repeat", type=int, default=1, metavar="K",
                   help="each job's results lines K times (rows for the page; the images and "
                        "thumbnails are the same: names repeat)")
    p.add_argument("--keep", type=Path, help="write the jobs here and keep them")
    args = p.parse_args()
    if find_chromium() is None:
        raise SystemExit(MISSING)
    root = args.keep or Path(tempfile.mkdtemp(prefix="camserve-bench-report-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        small = measure(root, max(10, args.n // 10), args.opens, args.workers, args.repeat)
        large = measure(root, args.n, args.opens, args.workers, args.repeat)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"{'rows':28}{small['n']:>12,}{large['n']:>12,}{'ratio':>9}")
    rows = [("generation, first run (s)", "gen_s", "{:.1f}"),
            ("generation, again (s)", "regen_s", "{:.2f}"),
            ("thumbnails made", "thumbs", "{:,}"),
            ("page + data on disk (MiB)", "page_bytes", "{:.2f}"),
            ("  of which gallery index (MiB)", "index_bytes", "{:.2f}"),
            ("data files", "data_files", "{:,}"),
            ("thumbnails on disk (MiB)", "thumb_bytes", "{:.1f}"),
            ("thumbnails' sizes (MiB)", "thumb_size", "{:.1f}"),
            ("open: first render (ms)", "open_ms", "{:.0f}"),
            ("open: navigate->ready (ms)", "open_wall_ms", "{:.0f}"),
            ("open: page 1 thumbs (ms)", "thumbs_ms", "{:.0f}"),
            ("text filter (ms)", "filter_ms", "{:.0f}"),
            ("metric sort (ms)", "sort_ms", "{:.0f}"),
            ("detail open (ms)", "detail_ms", "{:.0f}")]
    for label, key, form in rows:
        a, b = small[key], large[key]
        if key.endswith(("bytes", "size")):
            a, b = a / 2**20, b / 2**20
        ratio = f"{b / a:>8.1f}x" if a else ""
        print(f"{label:28}{form.format(a):>12}{form.format(b):>12}{ratio:>9}")
    print(f"medians of {args.opens} opens each; chunks (index, detail): {small['chunks']}, "
          f"{large['chunks']}; synthetic jobs written in {small['job_s']:.0f} s and "
          f"{large['job_s']:.0f} s; page problems: {small['problems'] + large['problems'] or 'none'}")


if __name__ == "__main__":
    main()
