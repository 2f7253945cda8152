"""Fetch and decode the image a task points at: the backend's SSRF and local-file boundary.

Task data is written by whoever can import tasks, so an image URL is untrusted input that makes
this process open connections and read files. The rules, and where each lives:

* Label Studio credentials go only to its media paths (``/data/upload/``, ``/data/local-files/``,
  ``/tasks/<id>/presign/``) on the Label Studio origin (scheme, host, port), and only while a
  redirect chain that started there stays there (``download``, ``label_studio_auth``).
* Any other http(s) host must be listed in ``IMAGE_ALLOWED_HOSTS`` ('*' = any public host), on every
  hop of a redirect chain (no hop inherits the trust of the one before it), and
  every address a host resolves to must be public unless it is the Label Studio host or
  ``IMAGE_ALLOW_PRIVATE`` is set (cloud metadata at 169.254.169.254, Redis on 127.0.0.1:6379...).
  The address check runs inside the connection, on the very address that is then connected to, so
  DNS rebinding between "check" and "connect" is impossible; redirects are followed by hand and
  every hop is checked again (``ssrf``, ``download``).
* ``/data/local-files/?d=`` is read under ``LOCAL_FILES_DOCUMENT_ROOT`` when configured, and only
  if the real path (symlinks resolved) stays inside it; cloud URIs go through Label Studio's
  presign endpoint (``loader``).
* Bytes, decoded pixels and time are bounded, time by one wall-clock deadline per image over
  connect, redirects and body (``deadline``); only raster formats Pillow decodes in-process are
  opened, no EPS/Ghostscript, no SVG (``decode``). Label Studio uploads are cached (``disk_cache``).

Callers import the public names from here.
"""

from backend.core.images.decode import decode_image
from backend.core.images.errors import ImageError
from backend.core.images.loader import ImageLoader, LoadedImage

__all__ = ["ImageError", "ImageLoader", "LoadedImage", "decode_image"]
