-- Never applied by pgfixture: dropping the table would fail the tests that use it.
DROP TABLE orders;
