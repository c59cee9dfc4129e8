"""The docs site built by `make docs`: browsable from disk, cross-references resolved, code highlighted."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    folder = tmp_path_factory.mktemp("site")
    argv = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(folder)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


def test_the_site_links_to_html_files_so_it_browses_from_disk(site):
    index = (site / "index.html").read_text()
    assert 'href="cli.html"' in index and 'href="reference.html"' in index
    assert (site / "cli.html").is_file() and not (site / "cli").exists()


def test_the_fipconfig_reference_links_fipmodel_and_keeps_its_heading_short(site):
    page = (site / "reference.html").read_text()
    assert "[<code>FIPModel</code>]" not in page and "[FIPModel]" not in page
    assert re.search(r'<a [^>]*href="#fip_peft\.method\.model\.FIPModel"[^>]*>', page)
    heading = re.search(r'<h2 id="fip_peft.method.config.FIPConfig".*?</h2>', page, flags=re.DOTALL).group(0)
    text = " ".join(re.sub(r"<[^>]+>", " ", heading).split())
    assert "target_modules" not in heading and len(text) < 40, text


def test_code_blocks_are_highlighted_offline(site):
    page = (site / "cli.html").read_text()
    assert '<div class="highlight">' in page and re.search(r'<span class="[a-z]{1,3}">', page)
    assert (site / "css" / "pygments.css").is_file()
    assert "cdnjs" not in page
