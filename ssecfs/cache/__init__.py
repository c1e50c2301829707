"""The encrypted local cache: plaintext chunks sealed on disk, the dirty-data journal that
survives a crash, accounting and eviction within a bound. Knows nothing of S3 or of files'
names beyond the opaque ids it is given.

Invariants
  * no plaintext is ever written to the cache directory (chunks and records are sealed,
    each entry under its own keys: crypto.Sealer.entry);
  * dirty chunks are never evicted; an entry is dirty from its first write until the
    write-back layer reports the generation it uploaded as durable; its chunks are evicted
    only once a clean record is durable (else a crash would recover the dirty record
    without the chunks it names);
  * a torn or altered slot or record fails authentication and is reported, never served.
"""

from .cachedir import Cache, default_cache_size
from .entry import CacheEntry
from .layout import CHUNK

__all__ = ["CHUNK", "Cache", "CacheEntry", "default_cache_size"]
