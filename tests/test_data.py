"""Tests for data.py: finding and decoding images, the dataset, batching, loaders, the demo set."""
import re
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from tqdm import tqdm

import data
import demo_flowers
import runtime
from data import DataError


def write_image(path, size=(32, 24), colour=(200, 30, 60)):
    """Save a small RGB image (any format PIL infers from the suffix), creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', size, colour).save(path)
    return path


def write_noise(path, size=(40, 30), seed=0):
    """Save a random RGB image, so crops and flips change the pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_bad_files(folder):
    """A zero-byte JPEG, a JPEG cut in half and a text file named .png."""
    empty = folder / 'empty.jpg'
    empty.write_bytes(b'')
    whole = write_noise(folder / 'whole.jpg', size=(64, 64))
    truncated = folder / 'truncated.jpg'
    truncated.write_bytes(whole.read_bytes()[:len(whole.read_bytes()) // 2])
    whole.unlink()
    text = folder / 'text.png'
    text.write_text('this is not an image\n')
    return [empty, truncated, text]


def test_find_images_is_recursive_sorted_and_case_insensitive(tmp_path):
    expected = [write_image(tmp_path / 'a' / 'x.JPG'), write_image(tmp_path / 'b.png'),
                write_image(tmp_path / 'c' / 'd' / 'e.webp'), write_image(tmp_path / 'f.Jpeg')]
    (tmp_path / 'notes.txt').write_text('not an image')
    write_image(tmp_path / '.ipynb_checkpoints' / 'copy.png')
    assert data.find_images(tmp_path) == sorted(expected)
    assert data.find_images(str(tmp_path)) == sorted(expected)


@pytest.mark.parametrize('case', ['missing', 'empty', 'file'])
def test_find_images_explains_bad_paths(tmp_path, case):
    path = {'missing': tmp_path / 'nope', 'empty': tmp_path, 'file': tmp_path / 'notes.txt'}[case]
    (tmp_path / 'notes.txt').write_text('not an image')
    with pytest.raises(DataError) as error:
        data.find_images(path)
    message = str(error.value)
    assert str(path) in message and message.endswith('.') and '\n' not in message


def palette_image(transparent):
    image = Image.new('P', (2, 1), 0)
    image.putpalette([200, 100, 50, 10, 20, 30] + [0] * 762)
    image.putpixel((1, 0), 1)
    if transparent:
        image.info['transparency'] = 1
    return image


# mode name -> (image to save, file suffix, expected RGB of pixel (0, 0), expected RGB of pixel (1, 0))
MODES = {
    'L': (lambda: Image.fromarray(np.array([[100, 7]], dtype=np.uint8), 'L'), '.png', (100,) * 3, (7,) * 3),
    'P': (lambda: palette_image(False), '.png', (200, 100, 50), (10, 20, 30)),
    'P-transparent': (lambda: palette_image(True), '.png', (200, 100, 50), (255, 255, 255)),
    'RGBA': (lambda: Image.fromarray(np.array([[[10, 20, 30, 255], [0, 0, 0, 0]]], dtype=np.uint8), 'RGBA'),
             '.png', (10, 20, 30), (255, 255, 255)),
    'LA': (lambda: Image.fromarray(np.array([[50, 50]], dtype=np.uint8), 'L').convert('LA'), '.png', (50,) * 3, None),
    'I;16': (lambda: Image.fromarray(np.array([[65535, 32896]], dtype=np.uint16)), '.png', (255,) * 3, (128,) * 3),
}


@pytest.mark.parametrize('mode', sorted(MODES))
def test_load_rgb_converts_every_mode(tmp_path, mode):
    make, suffix, first, second = MODES[mode]
    image = make()
    if mode == 'LA':  # pixel (1, 0) fully transparent
        image.putpixel((1, 0), (50, 0))
        second = (255, 255, 255)
    path = tmp_path / f'image{suffix}'
    image.save(path)
    if mode == 'I;16':
        assert Image.open(path).mode.startswith('I')  # really 16-bit on disk
    rgb = data.load_rgb(path)
    assert rgb.mode == 'RGB' and rgb.size == (2, 1)
    assert rgb.getpixel((0, 0)) == first and rgb.getpixel((1, 0)) == second


def test_load_rgb_converts_cmyk_jpeg(tmp_path):
    path = tmp_path / 'cmyk.jpg'
    Image.new('CMYK', (8, 8), (0, 255, 255, 0)).save(path, quality=95)  # no cyan, full magenta and yellow: red
    assert Image.open(path).mode == 'CMYK'
    red, green, blue = data.load_rgb(path).getpixel((4, 4))
    assert red > 240 and green < 15 and blue < 15


def test_large_jpegs_decode_at_a_reduced_scale_for_training_crops(tmp_path):
    """A 400x300 JPEG for 64-pixel crops decodes at 1/4 scale (100x75: the shorter side still >= 64); evaluation
    (train=False) and PNGs decode at full size; the reduced decode stays close to a full decode resized."""
    pixels = np.kron(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8), np.ones((10, 10, 1),
                                                                                                       np.uint8))
    Image.fromarray(pixels).save(tmp_path / 'big.jpg', quality=95)
    Image.fromarray(pixels).save(tmp_path / 'big.png')
    assert data.load_rgb(tmp_path / 'big.jpg', min_side=64).size == (100, 75)
    assert data.load_rgb(tmp_path / 'big.jpg', min_side=80).size == (200, 150)  # 1/4 would leave 75 < 80
    assert data.load_rgb(tmp_path / 'big.jpg').size == data.load_rgb(tmp_path / 'big.png', min_side=64).size == (400,
                                                                                                              300)
    reduced = np.asarray(data.load_rgb(tmp_path / 'big.jpg', min_side=64), dtype=np.float64)
    full = np.asarray(data.load_rgb(tmp_path / 'big.jpg').resize((100, 75), Image.BOX), dtype=np.float64)
    assert np.abs(reduced - full).mean() < 4  # about a box filter (4x4 means) of the full decode: 3.4 here
    assert data.ImageFolder(tmp_path, image_size=64, train=True, paths=[tmp_path / 'big.jpg'])[0]['image'].shape == \
        (3, 64, 64)


def test_load_rgb_raises_on_undecodable_files(tmp_path):
    for path in write_bad_files(tmp_path):
        with pytest.raises(Exception):
            data.load_rgb(path)


def test_image_folder_output_shape_dtype_and_range(tmp_path):
    write_noise(tmp_path / 'a.png', size=(40, 30))
    write_noise(tmp_path / 'b.jpg', size=(30, 50), seed=1)
    for train in (True, False):
        dataset = data.ImageFolder(tmp_path, image_size=16, train=train)
        assert len(dataset) == 2
        for item in dataset:
            image = item['image']
            assert image.shape == (3, 16, 16) and image.dtype == torch.float32
            assert image.min() >= -1 and image.max() <= 1 and 'label' not in item


def test_image_folder_eval_is_deterministic_and_train_follows_the_seed(tmp_path):
    write_noise(tmp_path / 'a.png', size=(64, 48))
    dataset = data.ImageFolder(tmp_path, image_size=16, train=False)
    assert torch.equal(dataset[0]['image'], dataset[0]['image'])
    dataset = data.ImageFolder(tmp_path, image_size=16, train=True)
    runtime.seed_everything(3)
    first = [dataset[0]['image'] for _ in range(4)]
    runtime.seed_everything(3)
    again = [dataset[0]['image'] for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(first[0], other) for other in first[1:])  # the crops do vary


def test_image_folder_upscales_small_images_and_centre_crops(tmp_path):
    write_image(tmp_path / 'small' / 'tiny.png', size=(10, 7))
    assert data.ImageFolder(tmp_path / 'small', image_size=16, train=False)[0]['image'].shape == (3, 16, 16)
    assert data.ImageFolder(tmp_path / 'small', image_size=16, train=True)[0]['image'].shape == (3, 16, 16)
    # 48x16: red, green and blue thirds; the centre crop of a 16-pixel image is the green third.
    stripes = np.zeros((16, 48, 3), dtype=np.uint8)
    stripes[:, :16, 0] = stripes[:, 16:32, 1] = stripes[:, 32:, 2] = 255
    Image.fromarray(stripes).save(tmp_path / 'wide.png')
    image = data.ImageFolder(tmp_path, image_size=16, train=False, paths=[tmp_path / 'wide.png'])[0]['image']
    assert torch.equal(image, torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 16, 16))


def test_image_folder_gives_an_unreadable_file_as_its_path_and_reason(tmp_path):
    empty, truncated, text = write_bad_files(tmp_path)
    write_noise(tmp_path / 'good.png')
    dataset = data.ImageFolder(tmp_path, image_size=16, train=False)
    items = {path: dataset[dataset.paths.index(path)] for path in (empty, truncated, text)}
    assert items[empty] == data.Unreadable(str(empty), 'cannot identify image file')  # the path is not said twice
    assert items[text] == data.Unreadable(str(text), 'cannot identify image file')
    assert items[truncated].path == str(truncated) and items[truncated].reason  # PIL's words vary by version
    assert isinstance(dataset[dataset.paths.index(tmp_path / 'good.png')], dict)


def test_image_folder_labels_come_from_top_level_sub_folders(tmp_path):
    write_image(tmp_path / 'dogs' / 'b.png')
    write_image(tmp_path / 'cats' / 'a.png')
    write_image(tmp_path / 'dogs' / 'puppies' / 'c.png')
    dataset = data.ImageFolder(tmp_path, image_size=8, with_labels=True)
    assert dataset.classes == ['cats', 'dogs']
    assert [dataset[i]['label'] for i in range(3)] == [0, 1, 1]
    # A split that lacks a class keeps the same class indices.
    dogs_only = data.ImageFolder(tmp_path, image_size=8, with_labels=True, paths=[tmp_path / 'dogs' / 'b.png'])
    assert dogs_only.classes == ['cats', 'dogs'] and dogs_only[0]['label'] == 1


def test_image_folder_labels_need_sub_folders(tmp_path):
    write_image(tmp_path / 'flat' / 'a.png')
    with pytest.raises(DataError, match='sub-folder'):
        data.ImageFolder(tmp_path / 'flat', image_size=8, with_labels=True)
    write_image(tmp_path / 'mixed' / 'loose.png')
    write_image(tmp_path / 'mixed' / 'cats' / 'a.png')
    with pytest.raises(DataError, match='loose.png'):
        data.ImageFolder(tmp_path / 'mixed', image_size=8, with_labels=True)


def test_collate_images_drops_bad_items():
    item, bad = {'image': torch.zeros(3, 4, 4), 'label': 2}, data.Unreadable('x.png', 'cannot identify image file')
    batch = data.collate_images([item, bad, item])
    assert batch['image'].shape == (2, 3, 4, 4) and batch['skipped'] == 1
    assert batch['label'].dtype == torch.long and batch['label'].tolist() == [2, 2]
    assert data.collate_images([bad, bad]) is None


def stderr_lines(text):
    """Lines of captured stderr; a progress bar redraws with \\r, so that ends a line too."""
    return [line for line in re.split(r"[\r\n]", text) if line.strip()]


@pytest.mark.parametrize('num_workers', [0, 2])
def test_a_loader_names_each_unreadable_file_once_in_a_line_of_its_own(tmp_path, capfd, num_workers):
    """Two passes with a progress bar on stderr; with workers, each file is read in a worker process."""
    for i in range(6):
        write_noise(tmp_path / f'good{i}.png', seed=i)
    truncated = write_bad_files(tmp_path)[1]
    for path in ('empty.jpg', 'text.png'):
        (tmp_path / path).unlink()  # 6 good files and a JPEG cut in half
    dataset = data.ImageFolder(tmp_path, image_size=8, train=True)
    loader = data.build_loader(dataset, batch_size=7, train=True, num_workers=num_workers)  # one batch a pass
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no warning: the project reports the file itself
        batches = []
        with tqdm(total=2, file=sys.stderr) as bar:
            for _ in range(2):
                for batch in loader:
                    batches.append(batch)
                    bar.update()
    assert [(batch['skipped'], len(batch['image'])) for batch in batches] == [(1, 6), (1, 6)]
    assert loader.unreadable == {str(truncated): dataset[dataset.paths.index(truncated)].reason}
    lines = stderr_lines(capfd.readouterr().err)
    named = [line for line in lines if str(truncated) in line]
    # A line of its own: tqdm.write clears the bar first (a plain print would continue the bar's line).
    assert named == [f"Skipping unreadable image '{truncated}': {loader.unreadable[str(truncated)]}."]
    assert not [line for line in lines if 'Warning' in line or 'site-packages' in line or 'Traceback' in line]


def test_a_loader_names_the_first_unreadable_files_then_counts_the_others(tmp_path, capfd):
    for i in range(data.MAX_NAMED_UNREADABLE + 2):
        (tmp_path / f'bad{i:02d}.png').write_text('not an image\n')
    write_noise(tmp_path / 'good.png')
    loader = data.build_loader(data.ImageFolder(tmp_path, image_size=8, train=False), batch_size=4, train=False)
    for _ in range(2):
        assert [len(batch['image']) for batch in loader if batch is not None] == [1]  # good.png alone in the last
    assert len(loader.unreadable) == data.MAX_NAMED_UNREADABLE + 2
    lines = stderr_lines(capfd.readouterr().err)  # the second pass says nothing more
    assert lines == [*(f"Skipping unreadable image '{tmp_path / f'bad{i:02d}.png'}': cannot identify image file."
                       for i in range(data.MAX_NAMED_UNREADABLE)),
                     f"Skipping 2 more unreadable image(s), not named ({data.MAX_NAMED_UNREADABLE + 2} in all)."]


def test_build_loader_shuffles_only_for_training(tmp_path):
    dataset = list(range(10))
    train = data.build_loader(dataset, batch_size=4)
    assert isinstance(train.sampler, torch.utils.data.RandomSampler) and train.drop_last
    val = data.build_loader(dataset, batch_size=4, train=False)
    assert isinstance(val.sampler, torch.utils.data.SequentialSampler) and not val.drop_last
    given = torch.utils.data.SequentialSampler(dataset)
    assert data.build_loader(dataset, batch_size=4, sampler=given).sampler is given


def test_split_paths_is_deterministic_and_disjoint():
    paths = [f'image{i:03d}.png' for i in range(100)]
    train, val = data.split_paths(paths, val_fraction=0.1, seed=0)
    assert (train, val) == data.split_paths(list(reversed(paths)), val_fraction=0.1, seed=0)
    assert len(val) == 10 and not set(train) & set(val) and sorted(train + val) == paths
    assert data.split_paths(paths, val_fraction=0.1, seed=1)[1] != val
    assert data.split_paths(paths[:2])[1] != [] and data.split_paths(paths[:1]) == (paths[:1], [])


def test_make_demo_flowers_is_deterministic(tmp_path):
    def contents(folder):
        return [path.read_bytes() for path in sorted(folder.glob('*.png'))]
    first = demo_flowers.make_demo_flowers(tmp_path / 'a', num_images=6, size=64, seed=0)
    demo_flowers.make_demo_flowers(tmp_path / 'b', num_images=6, size=64, seed=0)
    demo_flowers.make_demo_flowers(tmp_path / 'c', num_images=6, size=64, seed=1)
    assert len(contents(first)) == 6 and contents(first) == contents(tmp_path / 'b')
    assert all(a != c for a, c in zip(contents(first), contents(tmp_path / 'c')))
    assert Image.open(data.find_images(first)[0]).size == (64, 64)
    stamps = [path.stat().st_mtime_ns for path in sorted(first.glob('*.png'))]
    demo_flowers.make_demo_flowers(first, num_images=6, size=64, seed=0)  # already there: nothing is rewritten
    assert stamps == [path.stat().st_mtime_ns for path in sorted(first.glob('*.png'))]


def test_workers_draw_different_crops(tmp_path):
    # Four copies of one wide image: with a generator shared by the forked workers, worker 0's crops (items 0
    # and 2) would repeat worker 1's (items 1 and 3).
    pixels = np.random.default_rng(0).integers(0, 256, (20, 200, 3), dtype=np.uint8)
    for i in range(4):
        Image.fromarray(pixels).save(tmp_path / f'copy{i}.png')
    dataset = data.ImageFolder(tmp_path, image_size=8, train=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=data.collate_images)
    runtime.seed_everything(0)
    images = [batch['image'] for batch in loader]
    runtime.seed_everything(0)
    assert all(torch.equal(a, b['image']) for a, b in zip(images, loader))  # still reproducible
    assert not (torch.equal(images[0], images[1]) and torch.equal(images[2], images[3]))


@pytest.mark.parametrize("before, after", [(2, 2), (3, 2), (2, 3), (3, 1)])
def test_a_resumed_epoch_takes_every_remaining_item_once_with_any_number_of_ranks(before, after):
    """23 items, batches of 2: the ranks of `before` processes take 2 batches each, then `after` processes go on from
    the samples taken. The epoch sees no item twice and leaves out only what equal shards must (fewer than `after`
    items); with as many processes as before, each rank goes on exactly as if uninterrupted."""
    def ranks(world_size, start):
        samplers = [data.ResumableSampler(23, 2, seed=5, rank=r, world_size=world_size) for r in range(world_size)]
        for sampler in samplers:
            sampler.set_epoch(3, start)
        return [list(sampler) for sampler in samplers]

    whole_epoch = ranks(before, 0)
    taken = [i for shard in whole_epoch for i in shard[:4]]  # 2 batches of 2 per rank
    rest = ranks(after, len(taken))
    assert all(len(shard) == len(rest[0]) for shard in rest)  # equal shards: DDP's ranks stay in step
    seen = taken + [i for shard in rest for i in shard]
    assert len(seen) == len(set(seen)) and 23 - len(seen) < after
    assert sorted(taken) == sorted(whole_epoch_order(before)[:len(taken)])  # the order's first items
    if before == after:
        assert rest == [shard[4:] for shard in whole_epoch]


def whole_epoch_order(world_size):
    """The item order of epoch 3 (seed 5) that the ranks' shards interleave."""
    samplers = [data.ResumableSampler(23, 2, seed=5, rank=r, world_size=world_size) for r in range(world_size)]
    for sampler in samplers:
        sampler.set_epoch(3)
    shards = [list(sampler) for sampler in samplers]
    return [shard[i] for i in range(len(shards[0])) for shard in shards]


def test_missing_albumentations_is_one_sentence_when_an_image_folder_needs_it(tmp_path, monkeypatch):
    """data.py imports albumentations only for image folders: a node without it fails there in one sentence."""
    write_image(tmp_path / 'a.png')
    monkeypatch.setitem(sys.modules, 'albumentations', None)  # `import albumentations` now raises ImportError
    with pytest.raises(DataError, match='Image folders need the albumentations package .*docs/gpu.md'):
        data.ImageFolder(tmp_path, 16)
    monkeypatch.undo()
    assert len(data.ImageFolder(tmp_path, 16)) == 1
