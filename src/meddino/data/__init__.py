"""Data: readers (:mod:`.io`), pretraining sources (:mod:`.sources`), DINO multi-crop (:mod:`.multicrop`),
video frames (:mod:`.video`). Kept import-free so that ``import meddino.data`` costs nothing; import the
submodule you need (``from meddino.data.io import read_image``)."""
