"""docs/results.md cannot drift from its data: its tables are exactly what benchmark/aggregate.py makes from the run
summaries stored beside it, and the command it quotes is the one that makes them."""

import os

from benchmark import aggregate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "docs", "results.md")
BEGIN = "<!-- tables made by benchmark/aggregate.py: begin -->"
END = "<!-- tables made by benchmark/aggregate.py: end -->"
COMMAND = (
    "python benchmark/aggregate.py docs/results/der100k --published benchmark/reference/der_atari100k.csv "
    "--random-play docs/results/random_play.json --out docs/results/der100k_aggregate"
)


def page_text() -> str:
    with open(PAGE) as f:
        return f.read()


def test_the_page_quotes_the_command_that_makes_its_tables():
    one_line = " ".join(page_text().replace("\\\n", " ").split())  # shell line continuations joined
    assert COMMAND in one_line


def test_the_tables_are_what_aggregate_makes_from_the_stored_summaries(tmp_path):
    aggregate.main(
        aggregate.Args(
            run_dirs=[os.path.join(ROOT, "docs", "results", "der100k")],
            out=str(tmp_path),
            plots=False,
            published=os.path.join(ROOT, "benchmark", "reference", "der_atari100k.csv"),
            random_play=os.path.join(ROOT, "docs", "results", "random_play.json"),
        )
    )
    with open(tmp_path / "aggregate.md") as f:
        made = f.read().strip().splitlines()
    text = page_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    published = text.split(BEGIN)[1].split(END)[0].strip().splitlines()
    assert published == made
