"""Data: readers (:mod:`.io`), pretraining sources (:mod:`.sources`), DINO multi-crop (:mod:`.multicrop`;
on the training device: :mod:`.device_crops`),
fine-tuning's geometric augmentation (:mod:`.geometric`), labelled manifests (:mod:`.manifest`), patient-level
splits (:mod:`.splits`), video frames (:mod:`.video`) and the bundled demo data (:mod:`.bundled`).
"""

from meddino.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "read_image": ".io",
        "read_volume": ".volumes",
        "read_dicom": ".io",
        "PretrainSource": ".sources",
        "MultiCropAugmentation": ".multicrop",
        "DeviceCrops": ".device_crops",
        "GeometricAugment": ".geometric",
        "Manifest": ".manifest",
        "read_manifest": ".manifest",
        "patient_kfold": ".splits",
        "check_no_leak": ".splits",
        "extract_frames": ".video",
        "build_demo_data": ".bundled",
    },
)
