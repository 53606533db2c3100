"""Influence functions on the gradient engine (InfluenceFunction, method.py): one module per
solver family -- direct.py, iterative.py (CG, LiSSA), arnoldi.py, kfac.py (K-FAC, EK-FAC),
datainf.py -- sharing problem.py (the inputs, query gradients, scoring), hvp.py (Hessian-vector
products; hvp_sequential.py and hvp_conv.py their R-operator route for Sequential models), solver.py (the solver contract) and store.py (factors_dir)."""
from dvgs_fast.methods.influence.method import SOLVERS, InfluenceFunction
from dvgs_fast.methods.influence.solver import CurvatureWarning

__all__ = ["CurvatureWarning", "InfluenceFunction", "SOLVERS"]
