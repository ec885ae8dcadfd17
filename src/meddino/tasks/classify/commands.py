"""CLI verbs of the classification layer (declarations; the runners are in :mod:`.runners`).

``meddino embed``, ``meddino eval knn|linear|fewshot|finetune`` (all ``--config RECIPE key=value ...``),
``meddino data split MANIFEST out=FILE k=5 seed=0`` and ``meddino data manifest KIND SRC out=FILE``.
"""

from __future__ import annotations

from meddino.verbs import Arg, Verb

_SCHEMA = "meddino.tasks.classify.config:ClassifyConfig"
_HERE = "meddino.tasks.classify.runners"


def _eval(name: str, help: str, default_recipe: str) -> Verb:
    return Verb(name, group="eval", help=help, schema=_SCHEMA, run=f"{_HERE}:{name}", recipes="classify",
                default_recipe=default_recipe, run_folder="out")


VERBS = (
    Verb("embed", help="embed a labelled manifest with a frozen backbone (cache for frozen heads)", schema=_SCHEMA,
         run=f"{_HERE}:embed", recipes="classify", run_folder="out"),
    _eval("knn", "weighted kNN on frozen features (classification)", "seed001_knn"),
    _eval("linear", "linear-probe grid on frozen features (classification)", "seed001_linear"),
    _eval("fewshot", "few-shot linear probes, N patients per class (classification)", "seed001_fewshot"),
    _eval("finetune", "fine-tune the backbone: full, LoRA or BitFit (classification)", "seed001_finetune"),
    Verb("split", group="data", help="write a patient-level, label-stratified k-fold column into a manifest",
         schema="meddino.tasks.classify.config:SplitConfig", run=f"{_HERE}:run_split", recipes="classify",
         args=(Arg("manifest", "manifest", help="manifest CSV with image, patient and label columns"),)),
    Verb("manifest", group="data",
         help="write a labelled manifest from NIH ChestX-ray14, CheXpert or class folders",
         schema="meddino.tasks.classify.config:ManifestConfig", run=f"{_HERE}:run_manifest", recipes="classify",
         args=(Arg("kind", "kind", help="nih, chexpert or folder"),
               Arg("src", "src", help="the data set's label CSV (nih, chexpert) or a folder of class folders"))),
)
