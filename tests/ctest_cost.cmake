# Expected run time in seconds (clang ASan build, 2 cores) of the longest tests, for ctest's
# scheduler. ctest -j starts the most expensive tests first, but on a fresh checkout (CI) it has
# no Testing/Temporary/CTestCostData.txt yet and would run them in declaration order: a 100 s test
# that starts last leaves one core idle for most of its run. Measured costs, once ctest has them,
# override these. A name that no longer exists is ignored; keep the list to the slowest tests.
# Included by ctest after the gtest_discover_tests list (tests/CMakeLists.txt).
set_tests_properties(RolloverEngine.KillNineAtRandomPointsLosesNoMeter PROPERTIES COST 100)
set_tests_properties(CliHsm.KillDuringLargeImportThenReimportCompletes PROPERTIES COST 47)
set_tests_properties(SesdTls.FiveHundredConcurrentConnectionsEachGetAnAnswer PROPERTIES COST 39)
set_tests_properties(TransportKey.ImportedKeyIsLockedDownAndWrappedFleetWorks PROPERTIES COST 15)
set_tests_properties(BenchSmoke.DkusAgainstTheRealDaemon PROPERTIES COST 10)
set_tests_properties(SesdTls.WiresharkVerifiesTheSecuredCommands PROPERTIES COST 9)
set_tests_properties(TransportKey.RefusesBadPackagesAndLeavesNothingBehind PROPERTIES COST 8.5)
set_tests_properties(RolloverEngine.NoKeyStateChangeWithoutItsAuditRecord PROPERTIES COST 8)
set_tests_properties(RolloverEngine.FleetOverALossyRelayIsConfirmedWithRetries PROPERTIES COST 8)
set_tests_properties(TransportKey.WrongTransportKeyFailsEveryRowWithItsLine PROPERTIES COST 7.6)
set_tests_properties(SesdTls.SubjectNotInPolicyOrClassNotAllowedGetsIsc PROPERTIES COST 7.2)
set_tests_properties(BenchSmoke.RolloverUnderReadLoad PROPERTIES COST 7)
set_tests_properties(SesdSupervisor.KilledWorkerIsReplacedUnderLoadAndNoInvocationIdRepeats
                     PROPERTIES COST 6.2)
set_tests_properties(SesdAudit.KillMinus9UnderLoadLosesNoRecordOfADeliveredCommand PROPERTIES COST 6)
set_tests_properties(Challenge.AnAnswerAfterTheChallengeExpiredIsRefused PROPERTIES COST 6)
