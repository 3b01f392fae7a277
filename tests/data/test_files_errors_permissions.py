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
