"""The front page and the reference hold together: every relative link and #anchor in README.md and
docs/*.md resolves, every docs page is one click from the README, the README stays a front page
(at most 2,500 words, as `wc -w` counts), and docs/results.md holds results/results.md unchanged."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAX_README_WORDS = 2500

FENCE = re.compile(r"^```.*?^```", re.M | re.S)
COMMENT = re.compile(r"<!--.*?-->", re.S)
CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)\)")  # [text](target), ![alt](target)
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def pages(root):
    return [root / "README.md"] + sorted((root / "docs").glob("*.md"))


def prose(text):
    """The text a reader sees as markdown: no fenced blocks, no HTML comments, no inline code."""
    return CODE.sub("", COMMENT.sub("", FENCE.sub("", text)))


def slug(heading):
    """GitHub's anchor for a heading: its rendered text, lower-cased, punctuation dropped, spaces to -."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    """Every heading's anchor in a markdown file; a repeated one gets -1, -2, ... as on GitHub."""
    seen, out = {}, set()
    for h in HEADING.findall(FENCE.sub("", COMMENT.sub("", path.read_text()))):
        s = slug(h)
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


def links(path):
    """Relative link targets of a markdown file (absolute URLs and mailto: left out)."""
    return [t for t in LINK.findall(prose(path.read_text())) if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]


def broken_links(root):
    """'page: target (why)' for every relative link whose file is missing or whose #anchor is no heading there."""
    bad = []
    for page in pages(root):
        for target in links(page):
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                bad.append(f"{page.relative_to(root)}: {target} (no such file)")
            elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
                bad.append(f"{page.relative_to(root)}: {target} (no heading with that anchor)")
    return bad


def unlinked_docs(root):
    """docs/*.md that the README does not link to."""
    linked = {(root / t.partition("#")[0]).resolve() for t in links(root / "README.md") if t.partition("#")[0]}
    return [p.name for p in sorted((root / "docs").glob("*.md")) if p.resolve() not in linked]


def words(path):
    return len(path.read_text().split())  # wc -w: runs of non-whitespace


# ---------------------------------------------------------------- the repository's pages


def test_every_relative_link_and_anchor_resolves():
    assert len(pages(ROOT)) > 1 and sum(len(links(p)) for p in pages(ROOT)) > 20  # the pages were read
    assert broken_links(ROOT) == []


def test_every_docs_page_is_one_click_from_the_readme():
    assert unlinked_docs(ROOT) == []


def test_readme_is_a_front_page():
    assert words(ROOT / "README.md") <= MAX_README_WORDS, words(ROOT / "README.md")


def test_docs_results_holds_the_generated_tables_unchanged():
    """results.py writes results/results.md; docs/results.md shows it, and must not drift from it."""
    generated = (ROOT / "results" / "results.md").read_text().strip()
    assert generated.count("| GRPO |") == 2  # both regimes' tables
    assert generated in (ROOT / "docs" / "results.md").read_text()


# ---------------------------------------------------------------- the checks themselves can fail


def write(root, name, text):
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_link_check_finds_a_missing_file_and_a_wrong_anchor(tmp_path):
    write(tmp_path, "README.md", "# Front\n\n## On a GPU: `--fsdp` (FSDP2)\n\nSee [usage](docs/usage.md), "
                                 "[flags](docs/usage.md#the-flags), [gone](docs/gone.md), [self](#on-a-gpu---fsdp-fsdp2), "
                                 "[wrong](docs/usage.md#no-such-heading) and [web](https://example.com/x.md).\n"
                                 "`[in code](docs/nothing.md)`\n```\n[in a block](docs/nothing.md)\n```\n"
                                 "<!-- [in a comment](docs/nothing.md) -->\n")
    write(tmp_path, "docs/usage.md", "# Usage\n\n## The flags\n\n## The flags\n\n[back](../README.md#front) "
                                     "[second](#the-flags-1) [third](#the-flags-2)\n")
    write(tmp_path, "docs/orphan.md", "# Not linked from the README\n")
    assert broken_links(tmp_path) == ["README.md: docs/gone.md (no such file)",
                                      "README.md: docs/usage.md#no-such-heading (no heading with that anchor)",
                                      "docs/usage.md: #the-flags-2 (no heading with that anchor)"]
    assert unlinked_docs(tmp_path) == ["orphan.md"]


def test_github_slugs():
    assert slug("Generation: `--generation`") == "generation---generation"
    assert slug("Speed and memory on a CPU (`bench.py`)") == "speed-and-memory-on-a-cpu-benchpy"
    assert slug("Tracking: TensorBoard and W&B") == "tracking-tensorboard-and-wb"
    assert slug("What a run writes (`--out DIR`, default `runs/<script>-<time>`)") == \
        "what-a-run-writes---out-dir-default-runsscript-time"


def test_the_word_count_is_wc_w(tmp_path):
    write(tmp_path, "README.md", "one two\n\tthree  | --four |\n\n")
    assert words(tmp_path / "README.md") == 6


def test_the_readme_s_smollm2_answers_are_the_runs_it_names():
    """The README quotes SmolLM2's greedy answer to one question at step 0 and at a later step of the GRPO
    seed it names: both as results/smollm2/'s samples.jsonl holds them."""
    import json
    text = " ".join((ROOT / "README.md").read_text().split())
    m = re.search(r'"(What is [^"]*)" at step 0: "([^"]*)" \(cut\); at step (\d+) \(GRPO seed (\d)\): "([^"]*)"', text)
    assert m, "the README names the run its quoted answer comes from"
    question, first, step, seed, later = m.groups()
    path = ROOT / "results" / "smollm2" / f"sums1-grpo-s{seed}" / "samples.jsonl"
    rows = [json.loads(line) for line in open(path)]
    said = {r["step"]: " ".join(r["completion"].split()) for r in rows if r["kind"] == "eval" and r["question"] == question}
    assert said[0].startswith(first) and said[int(step)].startswith(later), said
