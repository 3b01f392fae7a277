"""An image this user may not read: the fix is its permissions, not re-extracting the dataset."""
import errno

import pytest

from segpcl_fast.data.base import DatasetFormatError, read_rgb


def test_unreadable_image_names_permissions(tmp_path, monkeypatch):
    import PIL.Image
    path = tmp_path / "x.jpg"

    def denied(p, *a, **k):  # chmod 000 does not stop root (the tests may run as root): the OS's answer instead
        raise PermissionError(errno.EACCES, "Permission denied", str(p))
    monkeypatch.setattr(PIL.Image, "open", denied)
    with pytest.raises(DatasetFormatError, match=r"image file '.*x.jpg' cannot be read: permission denied for this "
                                                  r"user; fix its permissions \(e.g. chmod -R a\+rX"):
        read_rgb(path)
    path.write_bytes(b"not an image")
    monkeypatch.undo()
    with pytest.raises(DatasetFormatError, match="re-extract it from the dataset's archive"):
        read_rgb(path)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    """PIL's convert('RGB') clips a 16-bit grayscale PNG at 255 (a 0..65535 ramp came out 99.6 % white);
    read_rgb scales it to 8 bits, as the 8-bit version of the same image reads."""
    import numpy as np
    from PIL import Image
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")
    got = np.asarray(read_rgb(tmp_path / "g16.png")).astype(int)
    expected = np.rint(ramp / 257.0).astype(int)
    assert got.shape == (64, 64, 3) and (got == expected[..., None]).all()
    Image.fromarray((ramp // 257).astype(np.uint8)).save(tmp_path / "g8.png")  # 8-bit files are untouched
    assert (np.asarray(read_rgb(tmp_path / "g8.png")) == (ramp // 257).astype(np.uint8)[..., None]).all()


def test_thirty_two_bit_grayscale_is_scaled_by_its_own_range(tmp_path):
    """A mode-I TIFF past 16 bits (an 8-bit image x 65536) came out all white under the 16-bit scale (a review's
    finding): mode I is scaled by the depth its largest value needs (16, 24 or 31 bits)."""
    import numpy as np
    from PIL import Image
    grey = np.arange(0, 256, dtype=np.int64).repeat(4).reshape(32, 32)
    for factor in (257, 65536, 2 ** 23):  # 16-, 24- and 31-bit data of one 8-bit image
        Image.fromarray((grey * factor).astype(np.int32), mode="I").save(tmp_path / "g.tiff")
        assert Image.open(tmp_path / "g.tiff").mode == "I"
        got = np.asarray(read_rgb(tmp_path / "g.tiff")).astype(int)
        assert got.shape == (32, 32, 3) and np.abs(got[..., 0] - grey).max() <= 1, factor
