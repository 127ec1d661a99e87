"""The codebook's switches against collapse, checked by hand on tiny tensors: projection, l2 norm, dead-code restarts,
and the usage statistics."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from codebook import Codebook, EMACodebook, codebook_usage, usage_from_counts


def as_map(rows):
    """(N, C) vectors -> a (1, C, 1, N) latent map, so that the codebook's flattening gives back `rows` in order."""
    return rows.t().reshape(1, rows.shape[1], 1, rows.shape[0])


def as_rows(z_map):
    """(1, C, 1, N) -> (N, C), the inverse of as_map."""
    return z_map.reshape(z_map.shape[1], -1).t()


# ---- the paper's quantizer stays the default ----

def test_default_is_the_papers_quantizer():
    cb = Codebook(num_codebook_vectors=2, latent_dim=2, beta=0.25)
    assert not hasattr(cb, "proj_in") and not hasattr(cb, "proj_out")
    assert not cb.l2_norm and not cb.restart_dead_codes and cb.codebook_dim == 2
    cb.embedding.weight.data = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
    z = torch.tensor([[0.5, -0.5], [3.0, 1.0]])  # nearest: code 0 (d=0.5), code 1 (d=2)
    z_q, indices, loss = cb(as_map(z))
    assert indices.flatten().tolist() == [0, 1]
    torch.testing.assert_close(as_rows(z_q), torch.tensor([[0.0, 0.0], [2.0, 2.0]]))
    # ||sg[z] - e||^2 + beta ||z - sg[e]||^2, both means over the 4 entries: (0.5 + 2) / 4 = 0.625 each.
    torch.testing.assert_close(loss, torch.tensor(0.625 * 1.25))


def test_default_never_touches_the_codes_in_training():
    cb = Codebook(num_codebook_vectors=4, latent_dim=2, restart_every=1).train()
    before = cb.embedding.weight.detach().clone()
    cb.train_steps = 5
    cb(as_map(torch.randn(8, 2)))
    assert torch.equal(cb.embedding.weight, before)


# ---- --codebook-dim: lookup in a low-dimensional space ----

def test_projection_looks_codes_up_in_the_low_dimensional_space():
    cb = Codebook(num_codebook_vectors=2, latent_dim=3, codebook_dim=2, beta=0.25)
    assert cb.embedding.weight.shape == (2, 2)
    with torch.no_grad():
        cb.proj_in.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))  # keep dims 0, 1; drop dim 2
        cb.proj_in.bias.zero_()
        cb.proj_out.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        cb.proj_out.bias.copy_(torch.tensor([0.0, 0.0, 5.0]))
        cb.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [4.0, 0.0]]))
    # In 3-D, z's third coordinate would decide: [1, 0, 9] is nearer [4, 0, 9] = proj_out(code 1) than
    # [0, 0, 5] = proj_out(code 0), yet in 2-D [1, 0] is nearer code 0.
    z = torch.tensor([[1.0, 0.0, 9.0], [3.0, 1.0, -7.0]])
    z_q, indices, loss = cb(as_map(z))
    assert indices.flatten().tolist() == [0, 1]
    expected = torch.tensor([[0.0, 0.0, 5.0], [4.0, 0.0, 9.0]])  # proj_out of codes 0 and 1
    torch.testing.assert_close(as_rows(z_q), expected)
    torch.testing.assert_close(as_rows(cb.lookup(indices)), expected)
    # The loss is taken in 2-D: squared distances 1 and 2 over 4 entries, times (1 + beta).
    torch.testing.assert_close(loss, torch.tensor(0.75 * 1.25))


def test_projection_passes_gradients_to_both_projections():
    torch.manual_seed(0)
    cb = Codebook(num_codebook_vectors=8, latent_dim=4, codebook_dim=2)
    z = torch.randn(1, 4, 2, 2, requires_grad=True)
    z_q, _, loss = cb(z)
    (z_q.sum() + loss).backward()
    for p in (z, cb.proj_in.weight, cb.proj_out.weight, cb.embedding.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


# ---- --codebook-l2-norm: cosine similarity ----

def test_l2_norm_picks_the_cosine_nearest_code():
    codes = torch.tensor([[1.0, 0.0], [3.0, 3.0]])
    z = torch.tensor([[0.5, 0.5]])  # Euclidean: code 0 (0.5 vs 12.5); cosine: code 1 (1.0 vs 0.71)
    plain, cosine = Codebook(num_codebook_vectors=2, latent_dim=2), Codebook(num_codebook_vectors=2, latent_dim=2,
                                                                            l2_norm=True)
    plain.embedding.weight.data, cosine.embedding.weight.data = codes.clone(), codes.clone()
    assert plain(as_map(z))[1].item() == 0
    z_q, indices, loss = cosine(as_map(z))
    assert indices.item() == 1
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(as_rows(z_q), torch.tensor([[s, s]]))  # the normalised code
    torch.testing.assert_close(loss, torch.tensor(0.0))  # the normalised input equals the normalised code
    torch.testing.assert_close(as_rows(cosine.lookup(indices)), torch.tensor([[s, s]]))


def test_l2_norm_after_the_projection():
    cb = Codebook(num_codebook_vectors=2, latent_dim=3, codebook_dim=2, l2_norm=True)
    with torch.no_grad():
        cb.proj_in.weight.copy_(torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]))
        cb.proj_in.bias.zero_()
        cb.proj_out.weight.copy_(torch.eye(3)[:, :2])
        cb.proj_out.bias.zero_()
        cb.embedding.weight.copy_(torch.tensor([[0.1, 0.0], [0.0, 5.0]]))
    z = torch.tensor([[0.2, 0.1, 0.0], [0.1, 3.0, 0.0]])  # projected: [0.4, 0.2] -> code 0, [0.2, 6] -> code 1
    z_q, indices, _ = cb(as_map(z))
    assert indices.flatten().tolist() == [0, 1]
    torch.testing.assert_close(as_rows(z_q), torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))


# ---- --restart-dead-codes ----

def restart_codebook(**kw):
    """8 codes of dimension 2 in a 3-D latent space, lookups by cosine; codes 1, 4 and 6 are dead."""
    torch.manual_seed(0)
    cb = Codebook(num_codebook_vectors=8, latent_dim=3, codebook_dim=2, l2_norm=True, restart_dead_codes=True,
                  restart_every=10, **kw).train()
    # hits since the last check, 800 in all: dead below 0.1 x 800 / 8 = 10 hits (below 3 under the 3% rule before)
    cb.hits_since_check.copy_(torch.tensor([200.0, 0, 200, 12, 5, 200, 9, 174]))  # code 3 rare but alive
    return cb


def test_dead_below_a_tenth_of_the_uniform_share_checked_every_25_steps():
    cb = Codebook(num_codebook_vectors=8, latent_dim=2, restart_dead_codes=True).train()  # the defaults
    cb.hits_since_check.copy_(torch.tensor([300.0, 10, 9, 0, 200, 100, 100, 81]))  # 800: the line is at 10 hits
    assert cb.dead_codes().tolist() == [False, False, True, True, False, False, False, False]
    before = cb.embedding.weight.detach().clone()
    cb.train_steps = 24
    cb(torch.randn(1, 2, 4, 4))
    assert torch.equal(cb.embedding.weight, before)  # not a check step
    cb.hits_since_check.copy_(torch.tensor([300.0, 10, 9, 0, 200, 100, 100, 81]))
    cb(torch.randn(1, 2, 4, 4))  # step 25
    changed = (cb.embedding.weight != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [2, 3]


def test_a_fading_code_is_reseeded_at_the_next_check():
    """Code 0 falls from the uniform share to a fifteenth of it after step 25: judged on the 25 steps since the
    last check against a tenth of the uniform share, it is re-seeded at step 50. (The 3% rule, judging 100 steps,
    would find it at 30% of the uniform share at step 100 and keep it.)"""
    cb = Codebook(num_codebook_vectors=4, latent_dim=2, restart_dead_codes=True).train()
    codes = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    cb.embedding.weight.data = codes.clone()
    for _ in range(25):
        cb(as_map(codes[[0, 1, 2, 3] * 15]))  # 60 vectors: a quarter of the hits each
    assert cb.hits_since_check.tolist() == [375.0] * 4
    for _ in range(25):
        cb(as_map(codes[[0] + [1, 2, 3] * 19 + [1, 2]]))  # code 0: 1 of 60 hits, 6.7% of the uniform share
    assert torch.equal(cb.embedding.weight, codes)  # the check at step 25 found every code alive
    assert cb.hits_since_check.tolist() == [25.0, 500.0, 500.0, 475.0]
    batch = torch.cat([codes[1:], torch.tensor([[5.0, 5.0], [-5.0, 5.0]])])
    cb(as_map(batch))  # step 50: a check
    assert torch.equal(cb.embedding.weight[1:], codes[1:])
    assert cb.embedding.weight[0].tolist() in batch.tolist()


def test_restart_reseeds_exactly_the_dead_codes_from_the_batch():
    cb = restart_codebook()
    assert cb.dead_codes().nonzero().flatten().tolist() == [1, 4, 6]
    before = cb.embedding.weight.detach().clone()
    z = torch.randn(1, 3, 4, 5)
    cb.train_steps = 20  # the check fires at multiples of restart_every
    _, indices, _ = cb(z)
    with torch.no_grad():
        z_low = F.normalize(cb.proj_in(z.permute(0, 2, 3, 1).reshape(-1, 3)), dim=-1)  # (20, 2): the lookup's inputs
    after = cb.embedding.weight.detach()
    changed = (after != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [1, 4, 6]
    picked = []
    for row in after[[1, 4, 6]]:
        match = ((z_low - row).abs().max(dim=1).values < 1e-6).nonzero().flatten()
        assert len(match) == 1  # each new code is one of this batch's projected, normalised encoder outputs
        picked.append(match.item())
    assert len(set(picked)) == 3  # three different outputs (the batch has more than enough)
    # The restart comes before this step's lookup: the outputs that seeded the codes are already quantized to them.
    assert indices.flatten()[picked].tolist() == [1, 4, 6]
    # The check started a new count: it holds this step's 20 hits only, so re-seeded codes get a fresh chance.
    torch.testing.assert_close(cb.hits_since_check, torch.bincount(indices.flatten(), minlength=8).float())


def test_restart_only_at_check_steps_and_only_in_training():
    cb = restart_codebook()
    before = cb.embedding.weight.detach().clone()
    z = torch.randn(1, 3, 4, 5)
    cb.train_steps = 19
    cb(z)  # not a multiple of restart_every
    assert torch.equal(cb.embedding.weight, before)
    cb.eval()
    cb(z)  # step 20, but evaluation neither restarts nor counts
    assert torch.equal(cb.embedding.weight, before) and cb.train_steps == 20
    cb.train_steps = 0
    cb.train()
    cb(z)  # step 0 has no hit history yet
    assert torch.equal(cb.embedding.weight, before)


def test_restart_with_a_batch_smaller_than_the_dead_set():
    cb = restart_codebook()
    cb.hits_since_check.copy_(torch.tensor([9.0, 0, 0, 0, 0, 0, 0, 0]))  # 7 dead codes, only 2 encoder outputs
    cb.train_steps = 10
    z = torch.randn(1, 3, 1, 2)
    cb(z)
    with torch.no_grad():
        z_low = F.normalize(cb.proj_in(as_rows(z)), dim=-1)
    distances = torch.cdist(cb.embedding.weight.detach(), z_low)  # (8, 2)
    assert (distances[1:].min(dim=1).values < 1e-6).all()


def test_dead_codes_are_judged_on_their_share_of_the_hits_since_the_last_check():
    cb = Codebook(num_codebook_vectors=4, latent_dim=2, restart_dead_codes=True, restart_every=2,
                  dead_threshold=0.8).train()
    codes = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    cb.embedding.weight.data = codes.clone()
    cb(as_map(codes[[0, 0, 0, 1]]))
    cb(as_map(codes[[2, 2]]))
    torch.testing.assert_close(cb.hits_since_check, torch.tensor([3.0, 1.0, 2.0, 0.0]))
    # dead below 0.8 of the uniform share: 0.8 x 6 / 4 = 1.2 hits
    assert cb.dead_codes().tolist() == [False, True, False, True]
    cb(as_map(codes[[0, 2]]))  # step 2, a check: codes 1 and 3 are re-seeded with these two outputs
    assert sorted(map(tuple, cb.embedding.weight.data[[1, 3]].tolist())) == [(0.0, 0.0), (0.0, 10.0)]
    assert cb.hits_since_check.sum() == 2  # a new count, from this step
    plain = Codebook(num_codebook_vectors=4, latent_dim=2).train()
    plain(as_map(codes[[0, 0]]))
    assert not plain.hits_since_check.any()  # nothing counted without restarts


# ---- usage statistics ----

@pytest.mark.parametrize("indices, num_codebook_vectors, usage, perplexity", [
    ([0, 0, 1, 1], 4, 0.5, 2.0),
    ([0, 1, 2, 3, 4, 5, 6, 7], 8, 1.0, 8.0),
    ([3, 3, 3, 3], 8, 0.125, 1.0),
    ([0, 0, 0, 1], 4, 0.5, math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))),
])
def test_codebook_usage_on_known_index_sets(indices, num_codebook_vectors, usage, perplexity):
    u, p = codebook_usage(torch.tensor(indices).reshape(2, 1, -1), num_codebook_vectors)  # any shape counts
    assert u == pytest.approx(usage) and p == pytest.approx(perplexity)


def test_usage_from_no_counts():
    assert usage_from_counts(torch.zeros(5)) == (0.0, 0.0)


def test_usage_window_keeps_the_last_steps_only():
    cb = Codebook(num_codebook_vectors=4, latent_dim=2, usage_window=2).train()
    cb.embedding.weight.data = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    codes = cb.embedding.weight.data
    for step in ([3, 3, 3], [0, 0], [0, 1]):  # the first step falls out of a window of 2
        cb(as_map(codes[step]))
    usage, perplexity = cb.usage()
    assert usage == pytest.approx(0.5)  # codes 0 and 1: 3 and 1 hits
    assert perplexity == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    cb.eval()
    cb(as_map(codes[[2, 2, 2, 2]]))  # evaluation does not enter the training window
    assert cb.usage()[0] == pytest.approx(0.5)


# ---- under DDP every rank takes the same decision ----

def _on_rank(rank, world_size, store_path, out_path):
    """One rank: different batches and random streams per rank; save the codes and statistics it ends with.

    Restarts every 2 steps over 6 steps of the VQ codebook; one check of the default rule on the hits of
    RANK_HITS; one step of the EMA codebook; one k-means initialisation."""
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    torch.manual_seed(0)  # the same initial codes on every rank, as DDP's first broadcast makes them
    cb = Codebook(num_codebook_vectors=16, latent_dim=3, codebook_dim=2, restart_dead_codes=True,
                  restart_every=2).train()
    judged, dead_codes = [], cb.dead_codes  # the hits each check judges
    cb.dead_codes = lambda: judged.append(cb.hits_since_check.clone()) or dead_codes()
    torch.manual_seed(100 + rank)  # different data and different random picks per rank
    for _ in range(6):
        cb(torch.randn(2, 3, 2, 2) + 3 * rank)
    torch.manual_seed(0)
    ruled = Codebook(num_codebook_vectors=8, latent_dim=2, restart_dead_codes=True).train()  # the default rule
    ruled.hits_since_check.copy_(RANK_HITS[rank])
    ruled.train_steps = 100  # a check, also for a rule that checks every 100 steps
    torch.manual_seed(200 + rank)
    batch = torch.randn(1, 2, 4, 4) + 3 * rank  # no vector of one rank's batch is in the other's
    ruled(batch)
    torch.manual_seed(0)
    ema = EMACodebook(num_codebook_vectors=8, latent_dim=2).train()
    ema(ema_batch(rank))
    km = Codebook(num_codebook_vectors=4, latent_dim=2, kmeans_init=True).train()
    km(kmeans_batch(rank))  # k-means of both ranks' rows, computed on rank 0 (whose random picks follow the batch)
    torch.save({"codes": cb.embedding.weight.detach(), "hits": judged[-1], **ema.state_dict(),
                "ruled_codes": ruled.embedding.weight.detach(), "ruled_batch": batch.permute(0, 2, 3, 1).reshape(-1, 2),
                "kmeans_codes": km.embedding.weight.detach()}, f"{out_path}.{rank}")
    dist.destroy_process_group()


# Each rank's hits since the last check. Summed (760): dead below 0.1 x 760 / 8 = 9.5 hits, codes 5 (8) and 6 (0).
# Rank 1 alone (360, dead below 4.5) would pick codes 4 (2) and 6; the 3% rule before, code 6 only.
RANK_HITS = (torch.tensor([50.0, 50, 50, 50, 50, 0, 0, 150]), torch.tensor([50.0, 50, 50, 50, 2, 8, 0, 150]))


def ema_batch(rank):
    torch.manual_seed(10 + rank)
    return torch.randn(1, 2, 2, 3) + 2 * rank


def kmeans_batch(rank):
    """Rank 0 holds 6 rows, rank 1 holds 2: a batch that lost images to unreadable files is smaller."""
    torch.manual_seed(20 + rank)
    return torch.randn(1, 2, 1, 6 - 4 * rank) + 3 * rank


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """What each of two gloo ranks ends with (one spawn for both tests)."""
    tmp_path = tmp_path_factory.mktemp("ranks")
    mp.spawn(_on_rank, args=(2, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2)
    return [torch.load(tmp_path / f"out.{rank}", weights_only=True) for rank in (0, 1)]


@pytest.mark.xdist_group("two_ranks")
def test_restarts_agree_across_ranks(two_ranks):
    r0, r1 = two_ranks
    torch.testing.assert_close(r0["hits"], r1["hits"], rtol=0, atol=0)
    assert r0["hits"].sum() == 2 * 2 * 2 * 4  # summed over ranks at the check of step 4: 2 steps, 2 ranks, 8 vectors
    torch.testing.assert_close(r0["codes"], r1["codes"], rtol=0, atol=0)
    torch.manual_seed(0)
    initial = Codebook(num_codebook_vectors=16, latent_dim=3, codebook_dim=2).embedding.weight.detach()
    assert (r0["codes"] != initial).any(dim=1).sum() > 0  # codes were restarted


@pytest.mark.xdist_group("two_ranks")
def test_both_ranks_reseed_the_codes_dead_on_the_summed_hits_with_the_same_outputs(two_ranks):
    r0, r1 = two_ranks
    torch.testing.assert_close(r0["ruled_codes"], r1["ruled_codes"], rtol=0, atol=0)
    torch.manual_seed(0)
    initial = Codebook(num_codebook_vectors=8, latent_dim=2).embedding.weight.detach()
    assert (r0["ruled_codes"] != initial).any(dim=1).nonzero().flatten().tolist() == [5, 6]
    new = r0["ruled_codes"][[5, 6]].tolist()
    assert all(row in r0["ruled_batch"].tolist() for row in new) and new[0] != new[1]  # rank 0's outputs, broadcast


@pytest.mark.xdist_group("two_ranks")
def test_ema_statistics_agree_across_ranks(two_ranks):
    r0, r1 = two_ranks
    keys = ("embedding.weight", "cluster_size", "embed_avg")
    for key in keys:
        torch.testing.assert_close(r0[key], r1[key], rtol=0, atol=0)
    # ... and they are those of one process that saw both ranks' batches
    torch.manual_seed(0)
    ema = EMACodebook(num_codebook_vectors=8, latent_dim=2).train()
    initial = ema.embedding.weight.clone()
    ema(torch.cat([ema_batch(0), ema_batch(1)]))
    for key in keys:
        torch.testing.assert_close(r0[key], ema.state_dict()[key])
    assert not torch.equal(r0["embedding.weight"], initial)


@pytest.mark.xdist_group("two_ranks")
def test_kmeans_init_gathers_ranks_of_unequal_row_counts(two_ranks):
    """Both ranks start from the codes of one process that saw rank 0's 6 rows and rank 1's 2 rows."""
    r0, r1 = two_ranks
    torch.testing.assert_close(r0["kmeans_codes"], r1["kmeans_codes"], rtol=0, atol=0)
    one = Codebook(num_codebook_vectors=4, latent_dim=2, kmeans_init=True).train()
    rows1 = kmeans_batch(1)
    rows0 = kmeans_batch(0)  # leaves the random stream where rank 0's was when it ran k-means
    one(torch.cat([rows0, rows1], dim=3))  # (1, 2, 1, 8): rank 0's rows, then rank 1's
    torch.testing.assert_close(r0["kmeans_codes"], one.embedding.weight.detach(), rtol=0, atol=0)
    assert (r0["kmeans_codes"][:, 0] > 1.5).any()  # a centre among rank 1's rows (shifted by 3): they were seen


def test_compiled_kmeans_init_compiles_once():
    """torch.compile of a k-means-initialised codebook: its graphs are compiled at the first steps and never again
    (reading the step counter in the compiled forward made every step a recompile until dynamo gave up at 8)."""
    graphs = []

    def counting_backend(gm, example_inputs):  # dynamo's graphs, run as they are
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.manual_seed(0)
    cb = Codebook(num_codebook_vectors=8, latent_dim=4, kmeans_init=True).train()
    compiled = torch.compile(cb, backend=counting_backend)
    counts = []
    for _ in range(12):
        z = torch.randn(2, 4, 3, 3, requires_grad=True)
        compiled(z)[0].sum().backward()
        counts.append(len(graphs))
    torch._dynamo.reset()
    assert cb.kmeans_done.item() and cb.train_steps == 12
    assert counts[-1] == counts[1] > 0, counts
