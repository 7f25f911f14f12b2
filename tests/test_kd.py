import torch
import torch.nn.functional as F

from splitkd.kd import kd_loss


def test_kd_loss_matches_the_formula() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 5), torch.randn(8, 5)
    labels = torch.randint(0, 5, (8,))
    alpha, tau = 0.7, 3.0
    p_t = F.softmax(teacher / tau, dim=1)
    p_s = F.softmax(student / tau, dim=1)
    kl = (p_t * (p_t.log() - p_s.log())).sum(dim=1).mean()
    ce = -F.log_softmax(student, dim=1)[torch.arange(8), labels].mean()
    loss = kd_loss(student, teacher, labels, alpha, tau)
    torch.testing.assert_close(loss.kd, kl * tau * tau)
    torch.testing.assert_close(loss.ce, ce)
    torch.testing.assert_close(loss.total, alpha * tau * tau * kl + (1 - alpha) * ce)


def test_kd_term_vanishes_when_student_equals_teacher() -> None:
    logits = torch.randn(4, 3)
    loss = kd_loss(logits, logits.clone(), torch.zeros(4, dtype=torch.long))
    assert abs(float(loss.kd)) < 1e-6
    assert float(loss.ce) > 0


def test_class_weights_weigh_the_ce_term_only() -> None:
    torch.manual_seed(1)
    student, teacher = torch.randn(6, 3), torch.randn(6, 3)
    labels = torch.tensor([0, 0, 0, 0, 1, 2])
    weights = torch.tensor([0.5, 2.0, 3.0])
    plain = kd_loss(student, teacher, labels, 0.6, 2.0)
    weighted = kd_loss(student, teacher, labels, 0.6, 2.0, weights)
    per_sample = -F.log_softmax(student, dim=1)[torch.arange(6), labels]
    w = weights[labels]
    torch.testing.assert_close(weighted.ce, (w * per_sample).sum() / w.sum())
    torch.testing.assert_close(weighted.kd, plain.kd)
    torch.testing.assert_close(weighted.total, 0.6 * plain.kd + 0.4 * weighted.ce)
    assert not torch.isclose(weighted.ce, plain.ce)
