"""The image metrics of an evaluation, all from torchmetrics: SSIM and LPIPS per sample, FID and
KID over the set.

Images are uint8 (3, H, W) tensors, as saved: every metric sees the PNG a user can open.
LPIPS needs torchvision and its AlexNet weights, the FID/KID Inception needs torch-fidelity and
its weights file; nothing is downloaded: without them the columns are left out and `missing`
says how to add them. FID and KID take any feature extractor module in their place (tests use
a small one); under torch.distributed their statistics are reduced across processes by
torchmetrics.
"""
import importlib.util
import warnings
from pathlib import Path

import torch

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception weights
KID_SUBSET = 1000  # torchmetrics' default subset size, capped at the sample count


def ssim(generated, truth):
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(_unit(generated)[None], _unit(truth)[None], data_range=1.0).item()


class PairedMetrics:
    """SSIM, and LPIPS (AlexNet) when its weights are local, of a generated image against its
    ground truth. `names` lists the columns computed, `missing` the lines saying why one is not."""

    def __init__(self, device="cpu"):
        self.names, self.missing, self._lpips = ["SSIM"], [], None
        why = lpips_unavailable()
        if why:
            self.missing.append(why)
        else:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            self._lpips = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True).to(device)
            self.names.append("LPIPS")
        self.device = device

    def __call__(self, generated, truth):
        if generated.shape != truth.shape:
            raise ValueError(f"the generated image is {tuple(generated.shape)} but its ground truth is "
                             f"{tuple(truth.shape)}: paired metrics need the same size")
        scores = {"SSIM": ssim(generated, truth)}
        if self._lpips is not None:
            pair = [_unit(x)[None].to(self.device) for x in (generated, truth)]
            scores["LPIPS"] = self._lpips(*pair).item()
            self._lpips.reset()
        return scores


def lpips_unavailable():
    """None when LPIPS can run without a download, else the line saying how to add it."""
    if importlib.util.find_spec("torchvision") is None:
        return ("LPIPS left out: it needs torchvision (pip install torchvision, the build matching your torch) "
                "and its AlexNet weights in the torch hub cache")
    import torchvision

    weights = torchvision.models.AlexNet_Weights.DEFAULT.url.rsplit("/", 1)[-1]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / weights
    if not cached.is_file():
        return f"LPIPS left out: torchvision's AlexNet weights are not local; put {weights} at {cached} to add it"
    return None


def inception(weights):
    """torch-fidelity's FID Inception v3 (2048 pool features) from a local weights file."""
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ModuleNotFoundError("the FID Inception needs torch-fidelity: pip install torch-fidelity")
    from torchmetrics.image.fid import NoTrainInceptionV3

    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                             feature_extractor_weights_path=str(weights))
    net.num_features = 2048
    return net


def inception_missing(weights):
    """None when FID and KID can use the Inception at `weights`, else the line saying how to add them."""
    if weights is None or not Path(weights).is_file():
        found = "" if weights is None else f" ({weights} does not exist)"
        return (f"FID and KID left out: they need the Inception weights as a local file{found}: get torch-fidelity's "
                f"{INCEPTION_FILE}, pip install torch-fidelity, and pass --inception-weights FILE")
    if importlib.util.find_spec("torch_fidelity") is None:
        return "FID and KID left out: the Inception needs torch-fidelity: pip install torch-fidelity"
    return None


class SetMetrics:
    """FID and KID of generated against real images, with `features` (a module returning (N, d)
    from uint8 (N, 3, H, W) images) as the feature extractor."""

    def __init__(self, features, samples, device="cpu"):
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        # torchmetrics keeps a module it is given; both metrics share the one extractor
        self.fid = FrechetInceptionDistance(feature=features, normalize=False).to(device)
        self.subset = min(KID_SUBSET, samples)
        with warnings.catch_warnings():  # KID keeps every feature vector: 16 KiB an image, known and small
            warnings.filterwarnings("ignore", "Metric `Kernel Inception Distance` will save all extracted features")
            self.kid = KernelInceptionDistance(feature=features, subset_size=self.subset, normalize=False).to(device)
        self.device, self.samples = device, samples

    def update(self, generated, real):
        for metric in (self.fid, self.kid):
            metric.update(real[None].to(self.device), real=True)
            metric.update(generated[None].to(self.device), real=False)

    def compute(self, seed=0):
        """{"FID", "KID"}, and "KID_std" over KID's random subsets when they are smaller than the
        set (a subset of the whole set has no spread but rounding). The subsets are drawn from
        `seed`, so that a run and its repetition agree."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            kid_mean, kid_std = self.kid.compute()
        scores = {"FID": self.fid.compute().item(), "KID": kid_mean.item()}
        if self.subset < self.samples:
            scores["KID_std"] = kid_std.item()
        return scores


def _unit(image):
    """uint8 (3, H, W) -> float in [0, 1]."""
    return image.float() / 255
