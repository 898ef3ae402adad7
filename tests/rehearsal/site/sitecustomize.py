"""The rehearsal's one change to third-party code: torchvision's md5 tables, for the rehearsal's jobs only.

tests/rehearsal/harness.py puts this folder on PYTHONPATH and MIXER_REHEARSAL_MD5 in the environment of the
Snakemake run, so every job's interpreter imports this module at start-up. When a job then imports one of the
torchvision modules named in that JSON file ({module: {class: {attribute: value}}}, written by
tests/rehearsal/standins.py), the class attributes are replaced right after the module ran (a mapping value
updates the attribute's mapping): torchvision's CIFAR-10/100 and Flowers-102 md5 checks then run on the
stand-ins' files against the stand-ins' md5s. Nothing changes without the variable, and torchvision is not
imported by this module. The pipeline's own code has no switch for this. (Being first on the path, this file
hides any other sitecustomize from the rehearsal's jobs, e.g. Debian's, which only installs an apport hook.)
"""
import importlib.abc
import importlib.machinery
import json
import os
import sys


class _PatchingLoader(importlib.abc.Loader):
    """Runs the module with its own loader, then sets the attributes."""

    def __init__(self, loader, patches):
        self._loader, self._patches = loader, patches

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        for class_name, attributes in self._patches.items():
            cls = getattr(module, class_name)
            for name, value in attributes.items():
                current = getattr(cls, name)
                setattr(cls, name, {**current, **value} if isinstance(current, dict) else value)

    def __getattr__(self, name):  # get_source, get_filename, ...: the module's own loader answers
        return getattr(self._loader, name)


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, patches):
        self._patches = patches

    def find_spec(self, name, path=None, target=None):
        if name not in self._patches:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader, self._patches[name])
        return spec


if os.environ.get("MIXER_REHEARSAL_MD5"):
    with open(os.environ["MIXER_REHEARSAL_MD5"]) as _f:
        sys.meta_path.insert(0, _PatchAfterImport(json.load(_f)))
