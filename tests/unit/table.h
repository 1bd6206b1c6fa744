#ifndef BW_TEST_TABLE_H
#define BW_TEST_TABLE_H

/*
 * The main() of a table-driven cmocka test: one test per row of CASES
 * (named after the row's .name, with the row as its state), run by TEST_FN,
 * followed by the hand-written tests of FIXED.  Include after <cmocka.h>.
 */
#define TABLE_TESTS_MAIN(cases, test_fn, fixed)                                  \
	int                                                                      \
	main(void)                                                               \
	{                                                                        \
		enum {                                                           \
			n_cases = sizeof(cases) / sizeof((cases)[0]),            \
			n_fixed = sizeof(fixed) / sizeof((fixed)[0]),            \
		};                                                               \
		struct CMUnitTest tests[n_cases + n_fixed];                      \
                                                                                 \
		for (size_t i = 0; i < n_cases; i++)                             \
			tests[i] = (struct CMUnitTest){                          \
				.name = (cases)[i].name,                         \
				.test_func = (test_fn),                          \
				.initial_state = (void *)&(cases)[i],            \
			};                                                       \
		for (size_t i = 0; i < n_fixed; i++)                             \
			tests[n_cases + i] = (fixed)[i];                         \
		return cmocka_run_group_tests(tests, NULL, NULL);                \
	}

#endif
