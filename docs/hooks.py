"""MkDocs hook: the benchmarks' figures (bench/results/*.png) go into the site beside the pages that show them.

The figures stay where the benchmarks write them; the pages link to ``bench/results/NAME.png``
relative to the site root.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]


def on_files(files: Files, config) -> Files:  # noqa: ANN001 - MkDocs' config object
    for png in sorted((ROOT / "bench" / "results").glob("*.png")):
        files.append(File.generated(config, f"bench/results/{png.name}", abs_src_path=str(png)))
    return files
