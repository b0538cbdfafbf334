"""Class subsets for ``mst-shards write --classes``: a file of class names, or a built-in list.

``imagenet100``: the 100 ImageNet-1k classes of CMC (Tian, Krishnan & Isola, "Contrastive Multiview
Coding", ECCV 2020), the list published as ``imagenet100.txt`` in github.com/HobbitLong/CMC and used
unchanged as "ImageNet-100" by solo-learn and many self-supervised papers.

``select_classes`` (in :mod:`data_tools.writer`) keeps the source's class order (sorted wnids / folder names) and numbers the kept classes
0…K−1 in that order, so train and val written with the same list get the same label for the same class
(the evaluators also match classes by name). The manifest records which list was used.
"""

from __future__ import annotations

import json
from pathlib import Path

from data_tools.writer import WriteError

IMAGENET100 = (
    "n02869837 n01749939 n02488291 n02107142 n13037406 n02091831 n04517823 n04589890 n03062245 n01773797 "
    "n01735189 n07831146 n07753275 n03085013 n04485082 n02105505 n01983481 n02788148 n03530642 n04435653 "
    "n02086910 n02859443 n13040303 n03594734 n02085620 n02099849 n01558993 n04493381 n02109047 n04111531 "
    "n02877765 n04429376 n02009229 n01978455 n02106550 n01820546 n01692333 n07714571 n02974003 n02114855 "
    "n03785016 n03764736 n03775546 n02087046 n07836838 n04099969 n04592741 n03891251 n02701002 n03379051 "
    "n02259212 n07715103 n03947888 n04026417 n02326432 n03637318 n01980166 n02113799 n02086240 n03903868 "
    "n02483362 n04127249 n02089973 n03017168 n02093428 n02804414 n02396427 n04418357 n02172182 n01729322 "
    "n02113978 n03787032 n02089867 n02119022 n03777754 n04238763 n02231487 n03032252 n02138441 n02104029 "
    "n03837869 n03494278 n04136333 n03794056 n03492542 n02018207 n04067472 n03930630 n03584829 n02123045 "
    "n04229816 n02100583 n03642806 n04336792 n03259280 n02116738 n02108089 n03424325 n01855672 n02090622"
).split()

BUILTIN = {"imagenet100": IMAGENET100}


def read_class_list(spec: str) -> tuple[str, list[str]]:
    """``--classes`` → (what to record, class names). A built-in name or a file of one wnid / folder
    name per line: blank lines and ``#`` comments skipped, surrounding spaces dropped, a UTF-8 BOM
    ignored; a name that holds ``#`` or surrounding spaces is written as a JSON string (``"a # b "``).
    Duplicates, an empty list, or a built-in name that is also a file here (which one was meant?): an error."""
    if spec in BUILTIN:
        if Path(spec).exists():
            raise WriteError(f"--classes {spec}: both a built-in list and a file in this folder; give ./{spec} for "
                             "the file (the built-in list is used only when no such file exists)")
        return spec, list(BUILTIN[spec])
    path = Path(spec)
    if not path.is_file():
        raise WriteError(f"--classes {spec}: neither a file nor a built-in list ({', '.join(BUILTIN)})")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise WriteError(f"--classes {spec}: unreadable ({type(err).__name__})") from None
    names = [_name(ln, spec, n) for n, ln in enumerate(lines, 1)]
    names = [n for n in names if n]
    if not names:
        raise WriteError(f"--classes {spec}: no class names (one wnid or folder name per line)")
    seen: set[str] = set()
    dupes = [n for n in names if n in seen or seen.add(n)]
    if dupes:
        raise WriteError(f"--classes {spec}: {dupes[0]} is listed twice")
    return str(path), names


def _name(line: str, spec: str, n: int) -> str:
    """One line's class name ('' for none): a JSON string verbatim, else the text before ``#``, stripped."""
    text = line.strip()
    if text.startswith('"'):
        try:
            name = json.loads(text)
        except ValueError:
            raise WriteError(f"--classes {spec}: line {n} starts with a quote but is not one JSON string") from None
        if not isinstance(name, str) or not name:
            raise WriteError(f"--classes {spec}: line {n} is not a non-empty JSON string")
        return name
    return text.split("#", 1)[0].strip()
