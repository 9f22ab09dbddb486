"""Zero-shot checks: tiny ImageNet, ESC-50 and ModelNet40 layouts read back, top-k by hand, classify end to end."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from model.imagebind.config import ImageBindConfig
from model.imagebind.encoder import ImageBind
from model.imagebind.model import ImageBindModel
from model.imagebind.point import farthest_points, seeded_starts
from model.imagebind.point_files import normalize_cloud
from model.imagebind.tokenizer import learn_merges, write_vocab
from pipelines.demo.synthetic_media import draw_shape, tone_wav
from pipelines.errors import InputError
from pipelines.evaluate.zeroshot import (
    KINDS,
    TEMPLATES,
    LabelledSet,
    Sample,
    ZeroShotResult,
    class_embeddings,
    classify,
    prepare_clouds,
    read_cloud,
    read_esc50,
    read_imagenet,
    read_labelled,
    read_modelnet40,
    topk_accuracy,
)

IMAGES = {"blue_square": ("square", "blue"), "green_star": ("star", "green"), "red_circle": ("circle", "red")}
SOUNDS = {0: ("dog", 220.0), 1: ("crying_baby", 660.0), 2: ("rain", 1500.0)}  # target: (category, tone Hz)
SHAPES = ("airplane", "flower_pot", "chair")
HEADER = ["filename", "fold", "target", "category", "esc10", "src_file", "take"]


def write_imagenet(root: Path) -> Path:
    for i, (folder, (shape, color)) in enumerate(IMAGES.items()):
        (root / folder).mkdir(parents=True)
        for j in range(2 + (i == 0)):  # 3, 2, 2 images; one .JPEG as ImageNet names them
            img = draw_shape((64, 48), shape, color, "grey", 0.6, seed=10 * i + j)
            img.save(root / folder / (f"img{j}.JPEG" if j == 1 else f"img{j}.png"))
    (root / "blue_square" / "notes.txt").write_text("not an image")  # ignored
    return root


def write_esc50(root: Path) -> Path:
    (root / "audio").mkdir(parents=True)
    (root / "meta").mkdir()
    rows = []
    for target, (category, hz) in SOUNDS.items():
        for fold in (1, 2):
            name = f"{fold}-{100 + target}-A-{target}.wav"
            (root / "audio" / name).write_bytes(tone_wav(1.0, 16000, 1, hz + 40 * fold))
            rows.append([name, fold, target, category, "False", str(100 + target), "A"])
    with open(root / "meta" / "esc50.csv", "w", newline="") as f:
        csv.writer(f).writerows([HEADER, *rows])
    return root


def cloud(shape: str, seed: int, n: int = 640) -> np.ndarray:
    """n points x,y,z,nx,ny,nz of a rough shape: a flat wing, a pot (cylinder), a chair-ish box."""
    rng = np.random.default_rng(seed)
    if shape == "airplane":
        xyz = rng.uniform(-1, 1, (n, 3)) * [2.0, 0.3, 0.05]
    elif shape == "flower_pot":
        a, h = rng.uniform(0, 2 * np.pi, n), rng.uniform(0, 1, n)
        xyz = np.stack([np.cos(a) * (0.3 + 0.2 * h), np.sin(a) * (0.3 + 0.2 * h), h], axis=1)
    else:
        xyz = rng.uniform(-0.5, 0.5, (n, 3)) + np.array([3.0, 1.0, 0.0])
    normals = xyz / np.linalg.norm(xyz, axis=1, keepdims=True)
    return np.concatenate([xyz, normals], axis=1)


def write_modelnet(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "modelnet40_shape_names.txt").write_text("\n".join(SHAPES) + "\n")
    for split, offset in (("test", 0), ("train", 50)):
        ids = []
        for k, shape in enumerate(SHAPES):
            (root / shape).mkdir(exist_ok=True)
            for j in range(2):
                shape_id = f"{shape}_{offset + j + 1:04d}"
                np.savetxt(root / shape / f"{shape_id}.txt", cloud(shape, 100 * k + offset + j), "%.6f", ",")
                ids.append(shape_id)
        (root / f"modelnet40_{split}.txt").write_text("\n".join(ids) + "\n")
    return root


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zeroshot")
    return {
        "image": write_imagenet(root / "imagenet"),
        "audio": write_esc50(root / "ESC-50-master"),
        "point": write_modelnet(root / "modelnet40_normal_resampled"),
    }


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> ImageBind:
    names = [n.replace("_", " ") for n in [*IMAGES, *SHAPES, *(c for c, _ in SOUNDS.values())]]
    texts = [t.replace("{}", n) for templates in TEMPLATES.values() for t in templates for n in names]
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt.gz"
    write_vocab(vocab, learn_merges(texts, 300))
    return ImageBind.load("tiny", vocab=str(vocab), device="cpu", dtype="float32", seed=0)


def test_layouts_read_back(sets: dict[str, Path]) -> None:
    images = read_imagenet(str(sets["image"]))
    assert (images.kind, images.layout) == ("image", "imagenet")
    assert images.classes == ("blue square", "green star", "red circle")
    assert [s.label for s in images.samples] == [0, 0, 0, 1, 1, 2, 2]
    assert images.samples[1] == Sample(str(sets["image"] / "blue_square" / "img1.JPEG"), 0)
    assert read_labelled("image", str(sets["image"])) == images

    sounds = read_esc50(str(sets["audio"]))
    assert (sounds.kind, sounds.layout, sounds.root) == ("audio", "esc50", str(sets["audio"]))
    assert sounds.classes == ("dog", "crying baby", "rain")
    assert [(Path(s.path).name, s.label) for s in sounds.samples[:2]] == [("1-100-A-0.wav", 0), ("2-100-A-0.wav", 0)]
    assert len(sounds.samples) == 6
    fold2 = read_labelled("audio", str(sets["audio"]), folds=[2])
    assert fold2.classes == sounds.classes and [s.label for s in fold2.samples] == [0, 1, 2]
    assert all(Path(s.path).name.startswith("2-") for s in fold2.samples)

    shapes = read_modelnet40(str(sets["point"]))
    assert (shapes.kind, shapes.layout) == ("point", "modelnet40")
    assert shapes.classes == ("airplane", "flower pot", "chair")
    assert [s.label for s in shapes.samples] == [0, 0, 1, 1, 2, 2]
    assert shapes.samples[2].path == str(sets["point"] / "flower_pot" / "flower_pot_0001.txt")
    train = read_labelled("point", str(sets["point"]), split="train")
    assert Path(train.samples[0].path).name == "airplane_0051.txt"
    xyz = read_cloud(shapes.samples[0].path)
    assert xyz.shape == (640, 3) and xyz.dtype == torch.float32
    np.testing.assert_allclose(xyz.numpy(), cloud("airplane", 0)[:, :3], atol=1e-6)


def test_classnames_file_names_the_classes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    wnids = tmp_path / "val"
    (wnids / "n01440764").mkdir(parents=True)
    draw_shape((32, 32), "circle", "red", "grey", 0.5, seed=0).save(wnids / "n01440764" / "a.JPEG")
    assert read_imagenet(str(wnids)).classes == ("n01440764",)
    assert "WordNet ids and there is no classnames.txt" in caplog.text
    root = write_imagenet(tmp_path / "in")
    (root / "classnames.txt").write_text("square\nstar\n\ncircle\n")  # blank lines skipped
    assert read_imagenet(str(root)).classes == ("square", "star", "circle")
    (root / "classnames.txt").write_text("square\nstar\n")
    with pytest.raises(InputError, match=rf"{root / 'classnames.txt'}: 2 names for 3 class folders"):
        read_imagenet(str(root))


def test_reader_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=f"not found: {tmp_path / 'none'}"):
        read_imagenet(str(tmp_path / "none"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=f"{tmp_path / 'empty'}: no class folders"):
        read_imagenet(str(tmp_path / "empty"))
    (tmp_path / "empty" / "cat").mkdir()
    with pytest.raises(InputError, match=f"{tmp_path / 'empty' / 'cat'}: empty class folder"):
        read_imagenet(str(tmp_path / "empty"))

    esc = write_esc50(tmp_path / "esc")
    table = esc / "meta" / "esc50.csv"
    with pytest.raises(InputError, match=rf"{table}: no fold 7; its folds are 1, 2"):
        read_esc50(str(esc), folds=[1, 7])
    (esc / "audio" / "2-101-A-1.wav").unlink()
    with pytest.raises(InputError, match=rf"{table} line 5: listed audio file not found: .*2-101-A-1\.wav"):
        read_esc50(str(esc))
    assert len(read_esc50(str(esc), folds=[1]).samples) == 3  # the missing file is in fold 2
    with pytest.raises(InputError, match=rf"{table}: no fold chosen"):
        read_esc50(str(esc), folds=[])
    text = table.read_text()
    table.write_text(text.replace(",1,crying_baby,", ",one,crying_baby,", 1))
    with pytest.raises(InputError, match=rf"{table} line 4: target and fold must be integers, got 'one' and '1'"):
        read_esc50(str(esc))
    table.write_text(text.replace("crying_baby", "laughing", 1))
    with pytest.raises(InputError, match=rf"{table} line 5: target 1 is 'crying_baby' here and 'laughing' above"):
        read_esc50(str(esc))
    table.write_text(text.replace("category", "label"))
    with pytest.raises(InputError, match=rf"{table}: no category column"):
        read_esc50(str(esc))
    table.unlink()
    with pytest.raises(InputError, match=f"no meta/esc50.csv .*: expected {table}"):
        read_esc50(str(esc))
    shutil.rmtree(esc / "audio")
    table.write_text(text)
    with pytest.raises(InputError, match=f"no audio folder: expected {esc / 'audio'}"):
        read_esc50(str(esc))

    mn = write_modelnet(tmp_path / "mn")
    split = mn / "modelnet40_test.txt"
    ids = split.read_text()
    (mn / "chair" / "chair_0002.txt").unlink()
    with pytest.raises(InputError, match=rf"{split} line 6: listed point-cloud file not found: .*chair_0002\.txt"):
        read_modelnet40(str(mn))
    split.write_text(ids.replace("chair_0001", "sofa_0001"))
    with pytest.raises(InputError, match=rf"{split} line 5: class 'sofa' of 'sofa_0001' is not in .*shape_names"):
        read_modelnet40(str(mn))
    split.write_text(ids.replace("chair_0001", "chair"))
    with pytest.raises(InputError, match=rf"{split} line 5: 'chair' is not <class>_<number>"):
        read_modelnet40(str(mn))
    with pytest.raises(InputError, match=f"no modelnet40_val.txt: expected {mn / 'modelnet40_val.txt'}"):
        read_modelnet40(str(mn), split="val")
    (mn / "modelnet40_shape_names.txt").unlink()
    with pytest.raises(InputError, match=f"expected {mn / 'modelnet40_shape_names.txt'}"):
        read_modelnet40(str(mn))
    with pytest.raises(InputError, match="unknown kind 'smell'"):
        read_labelled("smell", str(mn))


def test_topk_by_hand() -> None:
    logits = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.3, 0.2, 0.5],  # label 0: rank 0
            [0.9, 0.1, 0.0, 0.3, 0.2, 0.5],  # label 4: ranks 3 (0.9, 0.5, 0.3 above)
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 0: rank 5
            [0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
        ]  # label 3: all tied, 0..2 come first: rank 3
    )
    labels = torch.tensor([0, 4, 0, 3])
    assert topk_accuracy(logits, labels) == {1: 25.0, 5: 75.0}
    assert topk_accuracy(logits, labels, ks=(1, 3, 4, 6)) == {1: 25.0, 3: 25.0, 4: 75.0, 6: 100.0}
    three = torch.tensor([[0.1, 0.7, 0.2], [0.3, 0.3, 0.4], [0.2, 0.2, 0.1], [0.2, 0.2, 0.1]])
    # ranks: 0 -> 2; 2 -> 0; 1 ties with class 0 at a lower index -> 1; 0 wins its tie -> 0
    assert topk_accuracy(three, torch.tensor([0, 2, 1, 0]), ks=(1, 2, 5)) == {1: 50.0, 2: 75.0, 5: 100.0}
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.2"):
        topk_accuracy(three, torch.tensor([0, 1, 2, 3]))


def by_hand(encoder: ImageBind, data: LabelledSet, embeddings: torch.Tensor) -> tuple[float, float]:
    text = class_embeddings(encoder, data.classes, TEMPLATES[data.kind])
    assert text.shape == (len(data.classes), 1024)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(len(data.classes)))
    logits = embeddings @ text.T
    labels = torch.tensor([s.label for s in data.samples])
    top1 = 100.0 * float((logits.argmax(1) == labels).float().mean())
    return top1, topk_accuracy(logits, labels)[5]


def same(a: ZeroShotResult, b: ZeroShotResult) -> bool:
    return a.model_dump(exclude={"seconds"}) == b.model_dump(exclude={"seconds"})


@pytest.mark.parametrize("kind", KINDS)
def test_classify_matches_a_hand_computation(kind: str, encoder: ImageBind, sets: dict[str, Path]) -> None:
    data = read_labelled(kind, str(sets[kind]))
    calls: list[tuple[int, int]] = []
    result = classify(
        encoder,
        data,
        batch_size=4,
        point_resample=0 if kind == "point" else None,
        progress=lambda done, total: calls.append((done, total)),
    )
    n = len(data.samples)
    assert (result.kind, result.layout, result.classes, result.samples) == (kind, data.layout, 3, n)
    assert result.unreadable == 0 and result.unreadable_reasons == []
    assert result.templates == len(TEMPLATES[kind]) and result.encoder_id == "imagebind-tiny-init0"
    assert calls == [(4, n), (n, n)]
    paths = [s.path for s in data.samples]
    if kind == "image":
        emb = encoder.embed_images(paths, batch_size=4)
    elif kind == "audio":
        emb = encoder.embed_audio(paths, batch_size=4)
    else:  # read, centre and scale: Point-Bind's preparation with every point kept
        rows = [np.loadtxt(p, delimiter=",", dtype=np.float32) for p in paths]
        clouds = [normalize_cloud(torch.from_numpy(r[:, :3].copy())) for r in rows]
        emb = encoder.embed_points(clouds, batch_size=4)
    top1, top5 = by_hand(encoder, data, emb)
    assert result.top1 == pytest.approx(top1) and result.top5 == pytest.approx(top5) == 100.0  # 3 classes
    assert set(result.per_class_top1) == set(data.classes)
    wrong = round(n * (100 - top1) / 100)
    assert len(result.failures) == wrong
    assert all(f.label != f.predicted and f.label in data.classes for f in result.failures)
    assert same(result, classify(encoder, data, batch_size=4, point_resample=0 if kind == "point" else None))
    assert result.summary() == (
        f"zero-shot {kind} on {dict(image='ImageNet', audio='ESC-50', point='ModelNet40')[kind]} layout "
        f"(3 classes, {n} samples): top-1 {top1:.2f}%, top-3 100.00%"
    )


def test_limit_takes_a_seeded_shuffle(encoder: ImageBind, sets: dict[str, Path]) -> None:
    data = read_imagenet(str(sets["image"]))
    first = classify(encoder, data, limit=3, seed=5)
    assert first.samples == 3 and same(first, classify(encoder, data, limit=3, seed=5))
    chosen = torch.randperm(len(data.samples), generator=torch.Generator().manual_seed(5))[:3].tolist()
    labels = {data.samples[i].label for i in chosen}
    assert set(first.per_class_top1) == {data.classes[c] for c in labels}
    assert classify(encoder, data, limit=100).samples == len(data.samples)
    with pytest.raises(InputError, match="limit must be at least 1"):
        classify(encoder, data, limit=0)


def test_points_are_prepared_as_point_bind(encoder: ImageBind, sets: dict[str, Path]) -> None:
    data = read_modelnet40(str(sets["point"]))
    raw = [read_cloud(s.path) for s in data.samples]
    prepared = prepare_clouds(raw, 64, True, seed=3, device=torch.device("cpu"))
    for cloud_xyz, out in zip(raw, prepared, strict=True):
        index = farthest_points(cloud_xyz[None], 64, seeded_starts([640], 3))[0]
        torch.testing.assert_close(out, normalize_cloud(cloud_xyz[index]))
        assert out.shape == (64, 3) and float(out.norm(dim=-1).max()) == pytest.approx(1.0)
    torch.testing.assert_close(prepare_clouds(raw[:1], 64, True, 3, torch.device("cpu"))[0], prepared[0])
    short = prepare_clouds([raw[0][:20]], 64, False, 0, torch.device("cpu"))[0]
    assert torch.equal(short, raw[0][:20])  # fewer points than asked: the cloud as it is
    result = classify(encoder, data, point_resample=64, seed=3)  # the default 8192 keeps these 640-point clouds whole
    top1, _ = by_hand(encoder, data, encoder.embed_points(prepared, seed=3))
    assert result.top1 == pytest.approx(top1)


def test_unreadable_samples_are_counted_and_skipped(tmp_path: Path, encoder: ImageBind) -> None:
    images = write_imagenet(tmp_path / "in")
    (images / "green_star" / "img0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    sounds = write_esc50(tmp_path / "esc")
    (sounds / "audio" / "1-102-A-2.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    shapes = write_modelnet(tmp_path / "mn")
    (shapes / "chair" / "chair_0001.txt").write_text("1,2,oops\n")
    np.savetxt(shapes / "airplane" / "airplane_0002.txt", cloud("airplane", 1, n=10), "%.6f", ",")  # < 16 points
    bad = {
        "image": [str(images / "green_star" / "img0.png")],
        "audio": [str(sounds / "audio" / "1-102-A-2.wav")],
        "point": [str(shapes / "airplane" / "airplane_0002.txt"), str(shapes / "chair" / "chair_0001.txt")],
    }
    for kind, root in (("image", images), ("audio", sounds), ("point", shapes)):
        data = read_labelled(kind, str(root))
        result = classify(encoder, data, batch_size=4)
        assert result.unreadable == len(bad[kind]) and result.samples == len(data.samples) - len(bad[kind])
        assert [r.split(":")[0] for r in result.unreadable_reasons] == sorted(bad[kind]), result.unreadable_reasons
        assert "unreadable skipped" in result.summary()
    assert "too small" in result.unreadable_reasons[0]
    gone = LabelledSet("image", str(images), ("star",), (Sample(bad["image"][0], 0),), "imagenet")
    with pytest.raises(InputError, match=rf"none of the 1 samples could be read; first: {bad['image'][0]}"):
        classify(encoder, gone)


def test_classify_refuses_what_it_cannot_run(encoder: ImageBind, sets: dict[str, Path]) -> None:
    points = read_modelnet40(str(sets["point"]))
    no_vocab = ImageBind(encoder.model, None, encoder.device, encoder.dtype, encoder.encoder_id)
    with pytest.raises(InputError, match="no CLIP BPE vocabulary"):
        classify(no_vocab, points)
    model = ImageBindModel(ImageBindConfig.from_preset("tiny").with_point(False)).eval()
    no_points = ImageBind(model, encoder.tokenizer, encoder.device, encoder.dtype, "imagebind-tiny-x")
    with pytest.raises(InputError, match=rf"{points.root}: a point set needs Point-Bind's weights"):
        classify(no_points, points)
    with pytest.raises(InputError, match=r"needs \{\} for the class name: 'a photo'"):
        classify(encoder, points, templates=["a photo of {}", "a photo"])
