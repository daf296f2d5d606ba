"""The Accountant's subscribers and their terms as columns indexed by subscriber id (issue 12).

A start holds every subscriber for the daemon's life. An object each (a ``SubscriberInfo`` with its
name's and its networks' strings, in a dict, and a dict of their terms alongside) was some 250-300 MB
of a start's peak at a million subscribers. Ledger ids are dense from 1 (the engine sizes its own
arrays by the largest, ``MAX_SUBSCRIBER_ID`` at most), so a subscriber's facts are a slot in arrays:

- ``SubscriberTable``: presence (a byte), the name and the networks' text (the networks joined by
  single spaces, as the eBPF source hands them to C) as UTF-8 in one arena each, a slot holding the
  text's start and length packed in one 64-bit word, the tariff as a small index into the tariff
  names seen, and ``since`` (when billing starts, until the billing account holds it) as an int64
  with a sentinel for None. It is a ``MutableMapping`` sid -> ``SubscriberView``, a light object
  read from and written to the table (``info.tariff = ...`` lands in the column).
- ``TermsTable``: per sid an index into the list of the distinct ``Terms`` objects (the Accountant's
  ``terms_for`` shares one object among the subscribers with the same inputs), each counted by its
  users so that a Terms nobody uses any more leaves the list and its slot is reused.

A change (a new name or networks, a subscriber added) appends its text to the arena; what it
replaced is counted stale and the arena is compacted once the stale bytes pass half of it, so a
long-running daemon's tables do not grow with its changes.

Threads: the daemon reads from several threads, mostly under its engine lock, and writes under it.
Writes take the table's own lock as well (a compaction must not lose a concurrent write). A read
takes no lock: a slot's text is one 64-bit word, read in one step, and a compaction swaps the
arena and its slots in one assignment, so a read sees the old or the new text, whole. A reader in C
that takes the networks' arena itself (``networks_arena``: the eBPF start's binding) holds the lock
meanwhile, so that what it reads stays one state.
"""

from __future__ import annotations

import operator
import sys
import threading
from array import array
from collections import Counter
from collections.abc import ItemsView, KeysView, MutableMapping, ValuesView
from contextlib import contextmanager
from itertools import accumulate, compress, repeat

from ext.constants import MAX_SUBSCRIBER_ID, TEXT_LENGTH_BITS

LENGTH_BITS = TEXT_LENGTH_BITS  # a text's length in the low bits of its slot, its start in the arena in the others
MAX_TEXT = (1 << LENGTH_BITS) - 1  # 16 MiB: a name, or the networks of one subscriber (some 400k of them)
MAX_ARENA = 1 << (64 - LENGTH_BITS)
NO_SINCE = -(1 << 63)  # ``since`` is None
MAX_SID = MAX_SUBSCRIBER_ID


def _check_sid(sid) -> int:
    """A subscriber id a table can hold, else a clear error (a write's; reads answer "not held")."""
    if isinstance(sid, bool) or not isinstance(sid, int):
        raise TypeError(f"a subscriber id is an int, not {type(sid).__name__}")
    if not 0 <= sid <= MAX_SID:
        raise ValueError(f"subscriber id {sid} is outside 0..{MAX_SID}")
    return sid


def _check_sids(sids: list) -> None:
    """``_check_sid`` of each, in bulk: a start's chunk of 10k ids checked in C, each one only if one is bad."""
    try:
        col = array("q", sids)
        if min(col) >= 0 and max(col) <= MAX_SID and bool not in set(map(type, sids)):
            return
    except (TypeError, OverflowError):
        pass
    for sid in sids:
        _check_sid(sid)


def _is_key(sid) -> bool:
    """``sid`` could be held (a Mapping's ``in`` and ``get`` answer False / the default otherwise)."""
    return isinstance(sid, int) and not isinstance(sid, bool) and 0 <= sid <= MAX_SID


def _grow(col: array, size: int, fill: int = 0) -> None:
    if len(col) < size:
        col.extend(array(col.typecode, [fill]) * (size - len(col)))


def _capacity(current: int, needed: int) -> int:
    """Doubling (as the engine's ``_grow_to``), so that ids added one by one cost amortised O(1)."""
    cap = max(current, 16)
    while cap < needed:
        cap *= 2
    return min(cap, MAX_SID + 1)


def _contiguous(sids: list) -> bool:
    """``sids`` are n consecutive ids, ascending (a ledger's chunk of rows): columns take them as slices."""
    return bool(sids) and sids[-1] - sids[0] == len(sids) - 1 and sids == list(range(sids[0], sids[-1] + 1))


class TextArena:
    """Texts, one per slot, in one bytearray: a slot's word is ``start << LENGTH_BITS | length`` (a length
    of 0: "", whatever the start)."""

    __slots__ = ("state", "stale")

    def __init__(self) -> None:
        self.state = (bytearray(), array("Q"))  # (arena, words): swapped as one by a compaction
        self.stale = 0  # bytes of the arena no slot points at any more

    def grow(self, size: int) -> None:
        _grow(self.state[1], size)

    def text(self, sid: int) -> str:
        arena, words = self.state
        word = words[sid]
        start = word >> LENGTH_BITS
        return arena[start:start + (word & MAX_TEXT)].decode("utf-8")

    def length(self, sid: int) -> int:
        return self.state[1][sid] & MAX_TEXT

    def pack(self, texts: list) -> tuple[bytes, list]:
        """The bytes of ``texts`` and each one's word once appended to the arena (not appended yet)."""
        joined = "".join(texts)
        if joined.isascii():  # (most: a character is a byte, no text encoded twice)
            blob, lengths = joined.encode("ascii"), list(map(len, texts))
        else:
            encoded = [t.encode("utf-8") for t in texts]
            blob, lengths = b"".join(encoded), list(map(len, encoded))
        if lengths and max(lengths) > MAX_TEXT:
            raise ValueError(f"a text of {max(lengths)} bytes: at most {MAX_TEXT} a subscriber")
        base = len(self.state[0])
        if base + len(blob) >= MAX_ARENA:
            raise ValueError("the subscriber table's texts passed 1 TiB")
        starts = accumulate(lengths, initial=base)
        return blob, [(start << LENGTH_BITS) | n for start, n in zip(starts, lengths)]

    def append(self, blob: bytes) -> None:
        self.state[0].extend(blob)  # before any slot points into it

    def set(self, sid: int, text: str) -> None:
        blob, (word,) = self.pack([text])
        self.append(blob)
        words = self.state[1]
        self.stale += words[sid] & MAX_TEXT
        words[sid] = word

    def maybe_compact(self, present: bytearray) -> bool:
        """Once more than half the arena is stale: the texts of the ``present`` slots copied to a new one
        (the others' slots: "")."""
        arena, words = self.state
        if self.stale * 2 <= len(arena):
            return False
        new_arena, new_words = bytearray(), array("Q", bytes(len(words) * words.itemsize))
        for sid in compress(range(len(present)), present):
            word = words[sid]
            if word:
                start, n = word >> LENGTH_BITS, word & MAX_TEXT
                new_words[sid] = (len(new_arena) << LENGTH_BITS) | n
                new_arena += arena[start:start + n]
        self.state, self.stale = (new_arena, new_words), 0
        return True

    def nbytes(self) -> int:
        arena, words = self.state
        return len(arena) + len(words) * words.itemsize

    def texts(self, present: bytearray) -> list[str]:
        """The texts of the ``present`` slots, in slot order, made in C (a start's every network: a view and
        a decode each were 1.8 s at a million subscribers, three times a dict's attribute)."""
        arena, words = self.state
        chosen = array("Q", compress(words, present))
        if sys.byteorder != "little" or not arena.isascii():  # (byte offsets are not a str's indexes then)
            return [arena[w >> LENGTH_BITS:(w >> LENGTH_BITS) + (w & MAX_TEXT)].decode("utf-8") for w in chosen]
        # each word's start and length, taken apart as bytes (little-endian: the length's 3 bytes, then the
        # start's 5), not as a million Python integers shifted and masked
        raw, k = chosen.tobytes(), len(chosen)
        start_bytes, length_bytes = bytearray(8 * k), bytearray(4 * k)
        for j in range(LENGTH_BITS // 8):
            length_bytes[j::4] = raw[j::8]
        for j in range(8 - LENGTH_BITS // 8):
            start_bytes[j::8] = raw[LENGTH_BITS // 8 + j::8]
        starts, lengths = array("Q"), array("I")
        starts.frombytes(start_bytes)
        lengths.frombytes(length_bytes)
        text = arena.decode("ascii")
        return list(map(text.__getitem__, map(slice, starts, map(operator.add, starts, lengths))))


class SubscriberInfo:
    """A subscriber's facts on their own (a config's, a test's; what ``SubscriberTable[sid] = `` takes),
    with the attributes of a table's ``SubscriberView``. ``addresses``, the networks as a tuple of texts,
    is held as one text joined by spaces (no network's text has one: the engine refused it first)."""

    __slots__ = ("id", "name", "tariff", "_networks", "since")

    def __init__(self, id: int, name: str, tariff: str, addresses=(), since: int | None = None) -> None:
        self.id, self.name, self.tariff = id, name, tariff
        self.addresses = addresses
        self.since = since

    @property
    def addresses(self) -> tuple:
        return tuple(self._networks.split(" ")) if self._networks else ()

    @addresses.setter
    def addresses(self, networks) -> None:
        self._networks = SubscriberTable._networks_text(networks)

    @property
    def networks_text(self) -> str:
        """The networks as held: one text, joined by spaces ("" for none)."""
        return self._networks

    def __repr__(self) -> str:
        return f"SubscriberInfo({self.id!r}, {self.name!r}, {self.tariff!r}, {self.addresses!r})"


class SubscriberView:
    """One subscriber of a ``SubscriberTable``: its attributes are read from the table's columns when
    asked and written to them when set (a write to a subscriber the table no longer holds: KeyError).
    The daemon's threads read views outside its engine lock (metrics, quotas), so a view of a subscriber
    that left meanwhile still reads what it held then, as the object a dict dropped did, until the
    table reuses the space (a compaction, the id added again)."""

    __slots__ = ("table", "id")

    def __init__(self, table: SubscriberTable, sid: int) -> None:
        self.table, self.id = table, sid

    def _held(self) -> SubscriberTable:
        table = self.table
        if self.id >= len(table.present):  # (a table cleared since)
            raise KeyError(f"subscriber {self.id} is no longer in the table")
        return table

    def _text(self, arena: TextArena) -> str:
        # (inline, not TextArena.text: the daemon reads a million of these at a start, quotas and drift checks)
        data, words = arena.state
        try:
            word = words[self.id]
        except IndexError:  # (a table cleared since)
            raise KeyError(f"subscriber {self.id} is no longer in the table") from None
        start = word >> LENGTH_BITS
        return data[start:start + (word & MAX_TEXT)].decode("utf-8")

    @property
    def name(self) -> str:
        return self._text(self.table.names)

    @name.setter
    def name(self, name: str) -> None:
        self.table.set_name(self.id, name)

    @property
    def tariff(self) -> str:
        table = self._held()
        return table.tariff_names[table.tariffs[self.id]]

    @tariff.setter
    def tariff(self, tariff: str) -> None:
        self.table.set_tariff(self.id, tariff)

    @property
    def networks_text(self) -> str:
        """The networks as one text joined by spaces ("" for none), as the eBPF source hands them to C."""
        return self._text(self.table.networks)

    @property
    def addresses(self) -> tuple:
        text = self._text(self.table.networks)
        return tuple(text.split(" ")) if text else ()

    @addresses.setter
    def addresses(self, networks) -> None:
        self.table.set_networks(self.id, networks)

    @property
    def since(self) -> int | None:
        return self._held().since(self.id)

    @since.setter
    def since(self, since: int | None) -> None:
        self.table.set_since(self.id, since)

    def __eq__(self, other) -> bool:
        if not isinstance(other, (SubscriberView, SubscriberInfo)):
            return NotImplemented
        return (self.id, self.name, self.tariff, self.networks_text, self.since) == \
            (other.id, other.name, other.tariff, other.networks_text, other.since)

    __hash__ = None

    def __repr__(self) -> str:
        if not self.table.present[self.id]:
            return f"SubscriberView({self.id!r}, gone)"
        return f"SubscriberView({self.id!r}, {self.name!r}, {self.tariff!r}, {self.addresses!r})"


class _Keys(KeysView):
    def __iter__(self):
        return iter(self._mapping)


class _Items(ItemsView):
    def __iter__(self):
        m = self._mapping
        return zip(m, map(m._view, m))  # (views made as the items are walked, not all at once)


class _Values(ValuesView):
    def __iter__(self):
        m = self._mapping
        return map(m._view, m)


class SubscriberTable(MutableMapping):
    """sid -> ``SubscriberView`` over columns indexed by sid (see the module docstring). Ids are
    0..``MAX_SUBSCRIBER_ID``; iteration is in ascending id."""

    def __init__(self, items=()) -> None:
        self.lock = threading.Lock()  # writers (a compaction must not lose a write)
        self.present = bytearray()  # 1: held
        self.names, self.networks = TextArena(), TextArena()
        self.tariffs = array("H")  # index into tariff_names
        self.tariff_names: list[str] = []
        self.tariff_index: dict[str, int] = {}
        self.sinces = array("q")  # (shorter than the others after take_all_since: NO_SINCE beyond its end)
        self.count = 0
        for sid, info in dict(items).items():
            self[sid] = info

    # ---- columns -------------------------------------------------------------

    def _reserve(self, top: int) -> None:
        """Room for ids up to ``top`` (under the lock)."""
        if top < len(self.present):
            return
        size = _capacity(len(self.present), top + 1)
        _grow(self.tariffs, size)
        self.names.grow(size)
        self.networks.grow(size)
        self.present.extend(bytes(size - len(self.present)))  # last: a reader finds present only what it can read

    def _tariff(self, tariff: str) -> int:
        i = self.tariff_index.get(tariff)
        if i is None:
            if not isinstance(tariff, str):
                raise TypeError(f"a tariff is a name (str), not {type(tariff).__name__}")
            if len(self.tariff_names) > 0xFFFF:
                raise ValueError("more than 65536 tariff names")
            i = self.tariff_index[tariff] = len(self.tariff_names)
            self.tariff_names.append(tariff)
        return i

    @staticmethod
    def _since(since) -> int:
        if since is None:
            return NO_SINCE
        if isinstance(since, bool) or not isinstance(since, int):
            raise TypeError(f"since is an int of ns or None, not {type(since).__name__}")
        if not NO_SINCE < since < 1 << 63:
            raise ValueError(f"since {since} is out of the 64-bit range of ns")
        return since

    @classmethod
    def _since_column(cls, sinces: list) -> array:
        """``_since`` of each, in bulk (each one only if one is bad)."""
        try:
            col = array("q", [NO_SINCE if since is None else since for since in sinces])
            if col.count(NO_SINCE) == sinces.count(None) and bool not in set(map(type, sinces)):
                return col
        except (TypeError, OverflowError):
            pass
        return array("q", map(cls._since, sinces))

    @staticmethod
    def _networks_text(networks) -> str:
        if isinstance(networks, str):
            raise TypeError("networks are a sequence of texts, not one str")
        return " ".join(networks)

    def _compact(self) -> None:
        self.names.maybe_compact(self.present)
        self.networks.maybe_compact(self.present)

    # ---- writes --------------------------------------------------------------

    def fill(self, sids: list, names: list, tariffs: list, texts: list, sinces: list) -> None:
        """Add (or replace) subscribers ``sids[i]`` at once: a start's chunk of rows, one call. ``texts``:
        each subscriber's networks as one text joined by spaces, as the ledger gives them to a start and the
        engine took them ("" for none); ``sinces``: ns or None. All checked before anything changes."""
        n = len(sids)
        if not n == len(names) == len(tariffs) == len(texts) == len(sinces):
            raise ValueError("fill: the columns differ in length")
        if not n:
            return
        _check_sids(sids)
        if set(map(type, texts)) != {str}:
            raise TypeError("a subscriber's networks are one text joined by spaces")
        since_col = self._since_column(sinces)
        if set(map(type, names)) != {str}:
            raise TypeError(f"a name is a str, not {next(type(n).__name__ for n in names if type(n) is not str)}")
        with self.lock:
            name_blob, name_words = self.names.pack(names)
            net_blob, net_words = self.networks.pack(texts)
            for tariff in set(tariffs) - self.tariff_index.keys():
                self._tariff(tariff)
            tariff_col = array("H", map(self.tariff_index.__getitem__, tariffs))
            self._reserve(max(sids))
            _grow(self.sinces, len(self.present), NO_SINCE)  # (NO_SINCE in every row not held: take_all_since)
            self.names.append(name_blob)
            self.networks.append(net_blob)
            present = self.present
            lo, hi = sids[0], sids[-1] + 1
            # (the texts of a slot not present are counted stale already: see __delitem__)
            if _contiguous(sids) and present.find(1, lo, hi) == -1:  # a start: new ids in order, as slices
                self.names.state[1][lo:hi] = array("Q", name_words)
                self.networks.state[1][lo:hi] = array("Q", net_words)
                self.tariffs[lo:hi] = tariff_col
                self.sinces[lo:hi] = since_col
                present[lo:hi] = b"\x01" * n
                self.count += n
            else:
                names_w, nets_w = self.names.state[1], self.networks.state[1]
                for i, sid in enumerate(sids):
                    if present[sid]:
                        self.names.stale += names_w[sid] & MAX_TEXT
                        self.networks.stale += nets_w[sid] & MAX_TEXT
                    else:
                        self.count += 1
                    names_w[sid], nets_w[sid] = name_words[i], net_words[i]
                    self.tariffs[sid], self.sinces[sid] = tariff_col[i], since_col[i]
                    present[sid] = 1
                self._compact()

    def __setitem__(self, sid: int, info) -> None:
        """``table[sid] = info``: anything with ``name``, ``tariff``, ``addresses`` and ``since``
        (a ``SubscriberInfo``, another table's view)."""
        self.fill([sid], [info.name], [info.tariff], [self._networks_text(info.addresses)],
                  [getattr(info, "since", None)])

    def set_name(self, sid: int, name: str) -> None:
        if not isinstance(name, str):
            raise TypeError(f"a name is a str, not {type(name).__name__}")
        with self.lock:
            self._require(sid)
            self.names.set(sid, name)
            self._compact()

    def set_networks(self, sid: int, networks) -> None:
        text = self._networks_text(networks)
        with self.lock:
            self._require(sid)
            self.networks.set(sid, text)
            self._compact()

    def set_tariff(self, sid: int, tariff: str) -> None:
        with self.lock:
            self._require(sid)
            self.tariffs[sid] = self._tariff(tariff)

    def set_since(self, sid: int, since: int | None) -> None:
        value = self._since(since)
        with self.lock:
            self._require(sid)
            _grow(self.sinces, len(self.present), NO_SINCE)
            self.sinces[sid] = value

    def take_since(self, sid: int) -> int | None:
        """A held subscriber's ``since``, set to None as it is read (its billing account holds it from
        then on); None for a subscriber not held. (No view made: a start asks it of every subscriber.)"""
        with self.lock:
            sinces = self.sinces
            if not _is_key(sid) or sid >= len(sinces) or not self.present[sid]:
                return None
            since, sinces[sid] = sinces[sid], NO_SINCE
        return None if since == NO_SINCE else since

    def take_all_since(self) -> array:
        """``take_since`` of everyone at once (a start's ``start_billing``: a call each for a million was a
        second): an int64 per sid (up to the largest held, or shorter), ``NO_SINCE`` where none is known or
        the sid is not held. The column is empty after it (and grows again with the next since known)."""
        with self.lock:
            taken, self.sinces = self.sinces, array("q")
        return taken

    def __delitem__(self, sid: int) -> None:
        with self.lock:
            self._require(sid)
            # the row's columns stay as they are for its views (see SubscriberView), its texts counted stale
            self.present[sid] = 0
            if sid < len(self.sinces):
                self.sinces[sid] = NO_SINCE
            self.names.stale += self.names.length(sid)
            self.networks.stale += self.networks.length(sid)
            self.count -= 1
            self._compact()

    def clear(self) -> None:
        with self.lock:
            self.__init__()

    def _require(self, sid: int) -> None:
        if not self.__contains__(sid):
            raise KeyError(sid)

    # ---- reads ---------------------------------------------------------------

    def _view(self, sid: int) -> SubscriberView:
        return SubscriberView(self, sid)

    def __getitem__(self, sid: int) -> SubscriberView:
        present = self.present
        if type(sid) is int and 0 <= sid < len(present) and present[sid] or self.__contains__(sid):
            return SubscriberView(self, sid)
        raise KeyError(sid)

    def get(self, sid, default=None):
        present = self.present  # (__contains__ inline for an int: the daemon's threads ask a million at times)
        if type(sid) is int and 0 <= sid < len(present) and present[sid] or self.__contains__(sid):
            return SubscriberView(self, sid)
        return default

    def __contains__(self, sid) -> bool:
        return _is_key(sid) and sid < len(self.present) and self.present[sid] == 1

    def __iter__(self):
        present = self.present
        return compress(range(len(present)), present)

    def __len__(self) -> int:
        return self.count

    def keys(self):
        return _Keys(self)

    def items(self):
        return _Items(self)

    def values(self):
        return _Values(self)

    def networks_by_id(self) -> tuple[list[int], list[str]]:
        """(the held ids ascending, each one's networks' text), read at once from one state of the table
        (its writers wait meanwhile), no view made."""
        with self.lock:
            present = bytes(self.present)
            return list(compress(range(len(present)), present)), self.networks.texts(present)

    @contextmanager
    def networks_arena(self):
        """``with table.networks_arena() as (arena, words, present):`` the networks' texts as the table holds
        them, for a reader in C that takes them without a str each (the eBPF start binds a million
        subscribers' from here: ``Maps.set_subscriber_networks_arena``). ``present[sid]`` is 1 where ``sid``
        is held; its networks, joined by single spaces ("" for none), are ``arena[start:start + length]``
        with ``words[sid] == start << LENGTH_BITS | length`` (``words`` may be longer than ``present``). The
        table's lock is held for the block: its writers wait, so the three stay one consistent state
        (a compaction swaps them). Read them only within the block, and write nothing to the table from it
        (the lock is not reentrant)."""
        with self.lock:
            arena, words = self.networks.state
            yield arena, words, self.present

    def networks_texts(self) -> list[str]:
        """Every held subscriber's networks' text, in ascending id, no view made."""
        return self.networks_by_id()[1]

    def views(self, sids) -> dict:
        """``{sid: its view}`` of these held ``sids`` (views made in C, not a look-up each)."""
        return dict(zip(sids, map(SubscriberView, repeat(self), sids)))

    def all_networks(self) -> list[str]:
        """Every held subscriber's networks, in ascending id."""
        return " ".join(self.networks_texts()).split()  # (no network's text has a space; "" for none)

    def since_of(self) -> dict[int, int]:
        """``{sid: since}`` of the held subscribers whose ``since`` is known (no view made)."""
        sinces = self.sinces
        return {sid: sinces[sid] for sid in compress(range(len(sinces)), self.present) if sinces[sid] != NO_SINCE}

    def since(self, sid: int) -> int | None:
        """``sid``'s since (None: not known)."""
        sinces = self.sinces
        since = sinces[sid] if sid < len(sinces) else NO_SINCE
        return None if since == NO_SINCE else since

    def nbytes(self) -> dict[str, int]:
        """What each column holds, in bytes (benches): the arenas with their slots."""
        return {"present": len(self.present), "names": self.names.nbytes(), "networks": self.networks.nbytes(),
                "tariffs": len(self.tariffs) * self.tariffs.itemsize, "since": len(self.sinces) * self.sinces.itemsize}

    def __repr__(self) -> str:
        return f"<SubscriberTable of {self.count} subscribers>"


class TermsTable(MutableMapping):
    """sid -> its ``Terms``, held as an index per sid (0: none) into the distinct Terms objects in use,
    each with the number of its subscribers (a Terms whose count drops to 0 leaves; its slot is reused).
    Objects are told apart by identity (the Accountant shares equal ones already); ``[sid]`` gives back
    the very object stored."""

    def __init__(self, items=()) -> None:
        self.lock = threading.Lock()
        self.index = array("I")  # per sid: 1 + the slot of its Terms in objects; 0: none
        self.objects: list = [None]  # slot 0: none
        self.users = array("Q", [0])  # per slot: how many sids hold it
        self.slot_of: dict[int, int] = {}  # id(Terms) -> its slot (the object is held: its id stays its own)
        self.free: list[int] = []
        self.count = 0
        for sid, terms in dict(items).items():
            self[sid] = terms

    def _slot(self, terms) -> int:
        slot = self.slot_of.get(id(terms))
        if slot is None:
            if terms is None:
                raise TypeError("terms are a Terms, not None")
            if self.free:
                slot = self.free.pop()
                self.objects[slot] = terms
            else:
                slot = len(self.objects)
                if slot > 0xFFFFFFFF:
                    raise ValueError("more than 2**32 distinct terms")
                self.objects.append(terms)
                self.users.append(0)
            self.slot_of[id(terms)] = slot
        return slot

    def _release(self, slot: int, n: int = 1) -> None:
        left = self.users[slot] - n
        self.users[slot] = left
        if not left:
            del self.slot_of[id(self.objects[slot])]
            self.objects[slot] = None
            self.free.append(slot)

    def fill(self, sids: list, terms: list) -> None:
        """``self[sids[i]] = terms[i]`` for all, at once (a start's chunk)."""
        if len(sids) != len(terms):
            raise ValueError("fill: the columns differ in length")
        if not sids:
            return
        _check_sids(sids)
        with self.lock:
            top = max(sids)
            if top >= len(self.index):
                _grow(self.index, _capacity(len(self.index), top + 1))
            index, users = self.index, self.users
            lo, hi = sids[0], sids[-1] + 1
            if _contiguous(sids) and not any(index[lo:hi]):  # new ids: nothing released on the way
                # a slot for each distinct object (one in most chunks), then the chunk's in C
                ids = list(map(id, terms))
                slot_of = {key: self._slot(t) for key, t in dict(zip(ids, terms)).items()}
                index[lo:hi] = array("I", map(slot_of.__getitem__, ids))
                self.count += len(sids)
                for slot, n in Counter(index[lo:hi]).items():
                    users[slot] += n
            else:
                for sid, t in zip(sids, terms):
                    slot = self._slot(t)  # (one at a time: a release on the way may free a slot)
                    users[slot] += 1  # before the old one's release: the same object stays
                    old = index[sid]
                    index[sid] = slot
                    if old:
                        self._release(old)
                    else:
                        self.count += 1

    def __setitem__(self, sid: int, terms) -> None:
        self.fill([sid], [terms])

    def __delitem__(self, sid: int) -> None:
        with self.lock:
            if not self.__contains__(sid):
                raise KeyError(sid)
            old, self.index[sid] = self.index[sid], 0
            self.count -= 1
            self._release(old)

    def __getitem__(self, sid: int):
        if not self.__contains__(sid):
            raise KeyError(sid)
        return self.objects[self.index[sid]]

    def get(self, sid, default=None):
        return self.objects[self.index[sid]] if self.__contains__(sid) else default

    def __contains__(self, sid) -> bool:
        return _is_key(sid) and sid < len(self.index) and self.index[sid] != 0

    def __iter__(self):
        index = self.index
        return compress(range(len(index)), index)

    def __len__(self) -> int:
        return self.count

    def keys(self):
        return _Keys(self)

    def items(self):
        return _TermsItems(self)

    def values(self):
        return _TermsValues(self)

    def distinct(self) -> list:
        """The distinct Terms objects held (a few, where ``values()`` gives one per subscriber)."""
        return [t for t in self.objects[1:] if t is not None]

    def holding(self, wanted) -> list[int]:
        """The sids, ascending, whose Terms is one of ``wanted`` (objects, by identity)."""
        slots = {self.slot_of[id(t)] for t in wanted if id(t) in self.slot_of}
        index = self.index
        return list(compress(range(len(index)), map(slots.__contains__, index))) if slots else []

    def nbytes(self) -> int:
        return len(self.index) * self.index.itemsize

    def __repr__(self) -> str:
        return f"<TermsTable of {self.count} subscribers, {len(self.slot_of)} distinct terms>"


class _TermsItems(ItemsView):
    def __iter__(self):
        m = self._mapping
        index, objects = m.index, m.objects
        for sid in compress(range(len(index)), index):
            slot = index[sid]  # (read with its sid: a change while the items are walked keeps them paired)
            if slot:
                yield sid, objects[slot]


class _TermsValues(ValuesView):
    def __iter__(self):
        m = self._mapping
        return map(m.objects.__getitem__, filter(None, m.index))
