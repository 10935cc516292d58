"""Audits of the guarantee: what attacks on the mechanism and the released model achieve.

* :mod:`dpjax.audit.statistics`: from IN/OUT attack scores to ROC, AUROC,
  TPR at low FPR and ε lower bounds (Clopper–Pearson, GDP, one run, f-DP).
* :mod:`dpjax.audit.whitebox`: canary gradients through a mechanism's real
  clip -> noise path; a broken mechanism gives ε_lb > its claimed ε.
"""
