"""API keys: format, hashing at rest, constant-time verification, revocation."""

import pytest

from moestack.errors import AuthenticationError
from moestack.tenancy.admission import authenticate
from moestack.tenancy.keys import generate_key, parse_key, secret_matches
from moestack.tenancy.tables import ApiKey
from moestack.tenancy.store import TenancyStore


@pytest.fixture
def store():
    s = TenancyStore.open("sqlite:///:memory:")
    yield s
    s.close()


def test_keys_are_unique_and_parse_back():
    a, b = generate_key(), generate_key()
    assert a.plaintext != b.plaintext and a.key_id != b.key_id
    assert parse_key(a.plaintext) == (a.key_id, a.plaintext.split("-", 2)[2])
    assert parse_key("sk-something-else") is None


def test_only_the_hash_of_the_secret_is_stored(store):
    _, key = store.create_tenant("acme")
    with store.session() as s:
        stored = s.get(ApiKey, key.key_id)
        columns = [str(getattr(stored, c.key)) for c in ApiKey.__table__.columns]
    secret = key.plaintext.split("-", 2)[2]
    assert all(secret not in value for value in columns)
    assert stored.secret_sha256 == key.secret_sha256


def test_secret_check_rejects_unknown_keys_without_shortcut():
    key = generate_key()
    secret = key.plaintext.split("-", 2)[2]
    assert secret_matches(secret, key.secret_sha256)
    assert not secret_matches(secret + "x", key.secret_sha256)
    assert not secret_matches(secret, None)  # unknown key id: still one comparison, still False


def test_authenticates_to_the_keys_tenant(store):
    store.create_tenant("other")
    _, key = store.create_tenant("acme", priority=2, weight=3.0, allowed_models=["m"])
    p = authenticate(store, key.plaintext)
    assert (p.tenant, p.key_id, p.priority, p.weight) == ("acme", key.key_id, 2, 3.0)
    assert p.allows("m") and not p.allows("n")


@pytest.mark.parametrize("mangle", [
    lambda k: k[:-1] + ("A" if k[-1] != "A" else "B"),  # wrong secret
    lambda k: "msk-" + "0" * 16 + k[20:],  # unknown key id
    lambda k: "",
    lambda k: "Bearer " + k,
])
def test_rejects_wrong_or_malformed_keys(store, mangle):
    _, key = store.create_tenant("acme")
    with pytest.raises(AuthenticationError):
        authenticate(store, mangle(key.plaintext))


def test_rejects_revoked_key_and_keeps_others(store):
    _, first = store.create_tenant("acme")
    second = store.create_key("acme", label="ci")
    store.revoke_key(first.key_id)
    with pytest.raises(AuthenticationError):
        authenticate(store, first.plaintext)
    assert authenticate(store, second.plaintext).tenant == "acme"
    assert store.get_tenant("acme").active_key_ids == (second.key_id,)


def test_a_tenant_cannot_revoke_another_tenants_key(store):
    _, a = store.create_tenant("a")
    store.create_tenant("b")
    with pytest.raises(Exception, match="no API key"):
        store.revoke_key(a.key_id, tenant="b")
    assert authenticate(store, a.plaintext).tenant == "a"
