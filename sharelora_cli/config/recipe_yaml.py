"""Recipe YAML, read with the schema in mind: yes/no/on/off and null are words where a string is expected.

YAML 1.1, which PyYAML and OmegaConf follow, reads the plain scalars yes/no/on/off/true/false (spelt
yes, Yes or YES) as booleans and null/~ as null. A recipe means `train.mixed_precision: no` or `data.split: off` as
words, so each such scalar is kept as its text wherever the schema's field takes a string but not
that boolean or null; elsewhere (`data.packing: yes`, `model.revision: null`) it keeps its YAML value.
Everything else is read exactly as OmegaConf reads it (its loader, with its limits on aliases).
"""

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from omegaconf._yaml import get_yaml_loader
from pydantic import BaseModel

BOOL_TAG, NULL_TAG = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:null"


class Word(str):
    """A plain scalar YAML 1.1 reads as a boolean or null; `yaml_value` is that reading."""

    yaml_value: bool | None


def _construct_word(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Word | bool | None:
    value = loader.construct_yaml_bool(node) if node.tag == BOOL_TAG else None
    if not node.value:  # `key:` with nothing after it is null, not a word
        return value
    word = Word(node.value)
    word.yaml_value = value
    return word


def _word_loader() -> type:
    word_loader: Any = type("WordLoader", (get_yaml_loader(),), {})  # a PyYAML loader class: untyped
    word_loader.add_constructor(BOOL_TAG, _construct_word)
    word_loader.add_constructor(NULL_TAG, _construct_word)
    return word_loader


def load_yaml(text: str, schema: type[BaseModel]) -> Any:
    """A recipe document as Python values, its words typed by `schema` (the recipe's root model)."""
    return typed(yaml.load(text, Loader=_word_loader()), schema)


def override_value(key: str, text: str, schema: type[BaseModel]) -> Any:
    """The value of `key=text` on the command line, typed by the field `key` names in `schema`."""
    return typed(yaml.load(text, Loader=_word_loader()), field_at(schema, key))


def typed(tree: Any, annotation: Any) -> Any:
    """tree with every Word replaced by its text or its YAML value, as `annotation` (the expected type) takes it."""
    if isinstance(tree, Word):
        return _resolve(tree, annotation)
    if isinstance(tree, dict):
        return {str(k) if isinstance(k, Word) else k: typed(v, _field(annotation, k)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [typed(v, _item(annotation)) for v in tree]
    return tree


def field_at(schema: type[BaseModel], key: str) -> Any:
    """The annotation of a dotted key (list indices `[n]` allowed); None where the schema has no such key."""
    annotation: Any = schema
    for part in key.replace("[", ".[").split("."):
        annotation = _item(annotation) if part.startswith("[") else _field(annotation, part)
    return annotation


def _resolve(word: Word, annotation: Any) -> Any:
    members = _members(annotation)
    if any(m is type(word.yaml_value) or m is word.yaml_value for m in members):  # a bool, or True as a Literal
        return word.yaml_value
    if any(m is str or isinstance(m, str) for m in members):
        return str(word)
    return word.yaml_value


def _members(annotation: Any) -> list:
    """The types a value may have (Literal members as the values themselves), unions and Annotated unwrapped."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _members(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [m for arg in get_args(annotation) for m in _members(arg)]
    if origin is Literal:
        return list(get_args(annotation))
    return [annotation]


def _field(annotation: Any, key: Any) -> Any:
    for member in _members(annotation):
        if isinstance(member, type) and issubclass(member, BaseModel) and key in member.model_fields:
            return member.model_fields[key].annotation
    return None


def _item(annotation: Any) -> Any:
    for member in _members(annotation):
        if get_origin(member) is list:
            return get_args(member)[0]
    return None
